"""Compiler contract: the structure of the programs XLA compiles from bn_jax.

Written for jax 0.10.2 (``WRITTEN_FOR``). These tests pin what the compiler
makes of bn_jax's code, not what bn_jax computes: the number of reductions
and full-size arrays in the fused training passes, optimization barriers per
platform, temporary memory, and the collectives of a cross-device step. A
compiler upgrade may change any of them with no bug in bn_jax, so on another
jax version they run as non-strict ``xfail``: a failure is reported (as
XFAIL, with the version in the reason) instead of failing the suite; on
0.10.2 they must pass. When one fails after an upgrade, inspect the new
program and update the number here (and ``WRITTEN_FOR``) if it is still the
fewest-pass program. What the programs compute is tested elsewhere
(``test_gradients.py``, ``test_distributed.py``).
"""

from __future__ import annotations

import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import PartitionSpec as P

import bn_jax
from tests import reference as ref
from tests.devices import cpu_only, require_devices

WRITTEN_FOR = "0.10.2"

pytestmark = pytest.mark.xfail(
    jax.__version__ != WRITTEN_FOR,
    reason=f"compiler contract written for jax {WRITTEN_FOR}, running jax {jax.__version__}",
    strict=False,
)

SHAPE = (32, 8, 8, 16)  # NHWC, features last
EPS = 1e-5


def bn_y(x, scale, bias, *, axis=-1, mask=None):
    norm = bn_jax.BatchNorm(axis=axis, epsilon=EPS)
    _, state = norm.init(x)
    y, _ = norm.apply({"scale": scale, "bias": bias}, state, x, training=True, mask=mask)
    return y


def inputs(shape, seed, dtype=jnp.float32):
    """x, scale, bias and a cotangent (all float32 unless ``dtype``)."""
    rng = np.random.default_rng(seed)
    c = shape[-1]
    x = jnp.asarray(1.5 + 2.0 * rng.standard_normal(shape), dtype)
    scale = jnp.asarray(1.0 + 0.5 * rng.standard_normal(c), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(c), jnp.float32)
    return x, scale, bias, jnp.asarray(rng.standard_normal(shape), dtype)


def vjp_fn(fn):
    def f(x, scale, bias, g):
        _, pullback = jax.vjp(lambda x, s, b: fn(x, s, b, axis=-1), x, scale, bias)
        return pullback(g)

    return f


# ------------------------------------------------------------ passes over x


def count_big_reductions(jaxpr, shape) -> int:
    n = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "reduce_sum" and eqn.invars[0].aval.shape == shape:
            n += 1
        for v in eqn.params.values():
            for sub in v if isinstance(v, (list, tuple)) else (v,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    n += count_big_reductions(inner, shape)
    return n


def test_backward_jaxpr_has_two_reductions():
    """Forward statistics (2) plus the fused backward (2): autodiff of the forward
    formula needs more, which this count would catch."""
    x, scale, bias, g = inputs(SHAPE, 11)
    ours = jax.make_jaxpr(vjp_fn(bn_y))(x, scale, bias, g).jaxpr
    plain = jax.make_jaxpr(vjp_fn(ref.plain_bn))(x, scale, bias, g).jaxpr
    assert count_big_reductions(ours, SHAPE) == 4
    assert count_big_reductions(plain, SHAPE) > 4  # the counter sees autodiff's extra sums


def written_arrays(text: str, shape) -> list[str]:
    """The element types of the non-parameter values of ``shape`` in the entry computation."""
    entry = text.split("ENTRY", 1)[1]
    dims = ",".join(map(str, shape))
    return [
        line.split(" = ", 1)[1].split("[", 1)[0].strip()
        for line in entry.splitlines()
        if " = " in line
        and re.match(rf"\s*[a-z0-9]+\[{dims}\]", line.split(" = ", 1)[1])
        and "parameter(" not in line
    ]


def hlo_passes(text: str, shape) -> tuple[int, int]:
    """(reduce ops anywhere, full-size values written by the entry computation)."""
    return len(re.findall(r" reduce\(", text)), len(written_arrays(text, shape))


@cpu_only
def test_compiled_backward_is_two_reductions_and_one_elementwise_pass():
    """Optimized HLO of the pullback: 2 + 2 reductions and dx as the only full-size
    array written: x_hat (and x - shift) are recomputed inside the passes, not stored."""
    x, scale, bias, g = inputs(SHAPE, 12)
    ours = jax.jit(vjp_fn(bn_y)).lower(x, scale, bias, g).compile().as_text()
    plain = jax.jit(vjp_fn(ref.plain_bn)).lower(x, scale, bias, g).compile().as_text()
    assert hlo_passes(ours, SHAPE) == (4, 1)
    reduces, big = hlo_passes(plain, SHAPE)
    assert reduces > 4 and big > 1  # what a regression to autodiff-of-forward looks like


@cpu_only
def test_compiled_training_forward_is_two_reductions_and_one_pass():
    x, scale, bias, _ = inputs(SHAPE, 13)
    fwd = jax.jit(lambda x, s, b: bn_y(x, s, b, axis=-1))
    assert hlo_passes(fwd.lower(x, scale, bias).compile().as_text(), SHAPE) == (2, 1)


@cpu_only
def test_compiled_bf16_backward_writes_no_float32_copy():
    """bfloat16: the pullback writes dx (bfloat16) and no full-size float32 array
    (each pass converts the cotangent itself)."""
    x, scale, bias, g = inputs(SHAPE, 23, jnp.bfloat16)
    text = jax.jit(vjp_fn(bn_y)).lower(x, scale, bias, g).compile().as_text()
    assert written_arrays(text, SHAPE) == ["bf16"]


def test_private_copies_are_lowered_on_cpu_only():
    """The optimization barriers that keep XLA:CPU's passes apart would split
    fusions on GPU (docs/design.md): lowered for CUDA, the program has none
    (``jax.checkpoint`` runs with ``prevent_cse=False``, so it adds none)."""
    x, scale, bias, g = inputs(SHAPE, 15)
    step = jax.jit(vjp_fn(bn_y))

    def barriers(platform):
        exported = jax.export.export(step, platforms=[platform])(x, scale, bias, g)
        return exported.mlir_module().count("stablehlo.optimization_barrier")

    assert barriers("cpu") > barriers("cuda") == 0


def test_backward_memory_no_more_than_autodiff():
    x, scale, bias, g = inputs(SHAPE, 14)

    def temp(fn):
        compiled = jax.jit(vjp_fn(fn)).lower(x, scale, bias, g).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert temp(bn_y) <= temp(ref.plain_bn)


# -------------------------------------------------------------- collectives

N_DEV = 8
PER_DEV = 4
C = 5

_COLLECTIVE = re.compile(
    r"=\s*(?P<shape>\(.*?\)|\S+)\s+"
    r"(?P<op>all-gather|all-reduce|all-to-all|reduce-scatter|collective-permute|"
    r"collective-broadcast)(?:-start)?\("
)


def collectives(fn, *args):
    """[(op, number of elements)] for each collective in fn's compiled HLO."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    out = []
    for line in text.splitlines():
        m = _COLLECTIVE.search(line)
        if m:
            dims = re.findall(r"[a-z]+\d*\[([\d,]*)\]", m["shape"])
            size = sum(int(np.prod([int(d) for d in s.split(",") if d])) for s in dims)
            out.append((m["op"], size))
    return out


@pytest.fixture(scope="module")
def mesh():
    require_devices(N_DEV)
    return jax.make_mesh((N_DEV,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(42)
    x = jnp.asarray(rng.standard_normal((N_DEV * PER_DEV, 3, C)) + 2.0, jnp.float32)
    w = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    params = {"scale": jnp.linspace(0.5, 1.5, C), "bias": jnp.linspace(-1.0, 1.0, C)}
    state = {"mean": jnp.zeros(C), "var": jnp.ones(C)}
    return x, w, params, state


def bn_step(norm, params, state, x, w):
    """Per-device training step: output, new state and grads of sum(y * w)."""

    def loss(p, x):
        y, new_state = norm.apply(p, state, x, training=True)
        return jnp.sum(y * w), (y, new_state)

    (_, (y, new_state)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
    return y, new_state, grads


def stacked(tree):
    return jax.tree.map(lambda a: a[None], tree)


def test_collective_count_forward_backward_eval(mesh, data):
    x, w, params, state = data
    norm = bn_jax.BatchNorm(axis_name="d", momentum=0.9)
    specs = dict(mesh=mesh, in_specs=(P(), P(), P("d"), P("d")))

    forward = jax.shard_map(
        lambda p, s, x, w: norm.apply(p, s, x, training=True),
        out_specs=(P("d"), P()),
        **specs,
    )
    # forward: one all-gather of the stacked (count, mean, M2), 3C per device
    assert collectives(forward, params, state, x, w) == [("all-gather", N_DEV * 3 * C)]

    train = jax.shard_map(partial(bn_step, norm), out_specs=(P("d"), P(), (P(), P("d"))), **specs)
    ops = sorted(collectives(train, params, state, x, w))
    # backward adds one all-reduce of 2C values (sum(g), sum(g * x_hat)); XLA
    # reuses it for the scale/bias gradients, so nothing else is communicated.
    assert ops == [("all-gather", N_DEV * 3 * C), ("all-reduce", 2 * C)], ops

    evaluate = jax.shard_map(
        lambda p, s, x, w: norm.apply(p, s, x, training=False),
        out_specs=(P("d"), P()),
        **specs,
    )
    assert collectives(evaluate, params, state, x, w) == []
    # sanity check of the counter itself: an explicit psum is seen
    psum = jax.shard_map(lambda x: lax.psum(x, "d"), mesh=mesh, in_specs=P("d"), out_specs=P())
    assert collectives(psum, x) == [("all-reduce", PER_DEV * 3 * C)]


def test_collective_count_with_groups(mesh, data):
    x, w, params, state = data
    groups = ((0, 1, 2, 3), (4, 5, 6, 7))
    norm = bn_jax.BatchNorm(axis_name="d", axis_index_groups=groups, momentum=0.9)
    train = jax.shard_map(
        lambda p, s, x, w: stacked(bn_step(norm, p, s, x, w)),
        mesh=mesh,
        in_specs=(P(), P(), P("d"), P("d")),
        out_specs=P("d"),
    )
    ops = sorted(collectives(train, params, state, x, w))
    # forward: 3C gathered within a group of 4. Backward: grouped psum is not
    # implemented under shard_map, so the tangent map sums an all-gather, whose
    # transpose is one reduce-scatter of 2C values within the group. The
    # all-reduce of 2C over all 8 devices sums the gradients of the replicated
    # (P()) scale and bias, which belong to the whole model, not to one group.
    assert ops == [
        ("all-gather", 4 * 3 * C),
        ("all-reduce", 2 * C),
        ("reduce-scatter", 2 * C),
    ], ops


def test_tuple_axis_name_on_2d_mesh_one_gather(data):
    """A batch sharded over two mesh axes syncs over both, still with one gather."""
    require_devices(N_DEV)
    x, w, params, state = data
    mesh2 = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    norm = bn_jax.BatchNorm(axis_name=("data", "fsdp"), momentum=0.9)
    rows = P(("data", "fsdp"))
    f = jax.shard_map(
        lambda p, s, x, w: (lambda y, s, g: (y, stacked(s), g))(*bn_step(norm, p, s, x, w)),
        mesh=mesh2,
        in_specs=(P(), P(), rows, rows),
        out_specs=(rows, rows, (P(), rows)),
    )
    ops = sorted(collectives(f, params, state, x, w))
    assert ops == [("all-gather", N_DEV * 3 * C), ("all-reduce", 2 * C)], ops


def test_shard_map_backward_one_all_reduce_of_2c(mesh):
    """The gradient of a sharded loss: one all_gather forward, one all-reduce of the
    2C per-channel sums backward."""
    c = 6
    x, scale, bias, w = inputs((16, 3, c), 15)
    norm = bn_jax.BatchNorm(axis_name="d")
    _, state = norm.init(c)

    def loss(params, x):
        f = jax.shard_map(
            lambda p, x: norm.apply(p, state, x, training=True)[0],
            mesh=mesh,
            in_specs=(P(), P("d")),
            out_specs=P("d"),
        )
        return jnp.sum(f(params, x) * w)

    params = {"scale": scale, "bias": bias}
    text = jax.jit(jax.grad(loss, (0, 1))).lower(params, x).compile().as_text()
    gathers = re.findall(r"= (\S+) all-gather\(", text)
    reduces = re.findall(r"= (\([^)]*\)|\S+) all-reduce\(", text)
    assert len(gathers) == 1, gathers
    assert len(reduces) == 1, reduces
    sizes = [
        int(np.prod([int(d) for d in s.split(",") if d]))
        for s in re.findall(r"f32\[([\d,]*)\]", reduces[0])
    ]
    assert sum(sizes) == 2 * c


def _mlp_step_temp_bytes(norm_cls, memory_efficient):
    """Compiled temporary memory of the gradient of 3 pre-norm residual MLP blocks
    (``norm_cls`` None: no normalization)."""
    rows, d = 256, 64
    keys = jax.random.split(jax.random.key(0), 3)
    params = {
        "w1": jax.random.normal(keys[0], (3, d, 4 * d)) / np.sqrt(d),
        "w2": jax.random.normal(keys[1], (3, 4 * d, d)) / np.sqrt(4 * d),
        "norm": [norm_cls().init(d)[0] if norm_cls else {} for _ in range(3)],
    }
    x = jax.random.normal(keys[2], (rows, d))

    def loss(p, x):
        for i in range(3):
            h = x
            if norm_cls is not None:
                norm = norm_cls(memory_efficient=memory_efficient)
                h, _ = norm.apply(p["norm"][i], {}, x, training=True)
            x = x + jnp.tanh(h @ p["w1"][i]) @ p["w2"][i]
        return jnp.sum(jnp.tanh(x))

    compiled = jax.jit(jax.grad(loss)).lower(params, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@cpu_only
@pytest.mark.parametrize("norm_cls", [bn_jax.LayerNorm, bn_jax.RMSNorm], ids=lambda c: c.__name__)
def test_memory_efficient_step_keeps_no_input_of_the_norm(norm_cls):
    # memory_efficient=True: the step needs the memory of the same step without
    # normalization plus at most one transient activation of the backward pass;
    # the plain layers keep each norm's input as well.
    activation = 256 * 64 * 4
    without = _mlp_step_temp_bytes(None, False)
    assert _mlp_step_temp_bytes(norm_cls, True) <= without + 1.1 * activation
    assert _mlp_step_temp_bytes(norm_cls, False) >= without + 3 * activation
