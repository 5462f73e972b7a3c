# %% [markdown]
# # 02 · Batch statistics across devices
#
# With data parallelism each device holds a slice of the batch. BatchNorm has to
# decide whose statistics to use: each device's own slice (cheap, but the statistics
# of a small, possibly unrepresentative slice), or the whole global batch (what the
# model would compute on one big device). `bn_jax.BatchNorm(axis_name=...)` gives the
# latter, exactly: outputs, gradients and running statistics equal the single-device
# computation on the concatenated batch.
#
# This notebook fakes 8 CPU devices, so it runs anywhere. The flag must be set before
# JAX starts.

# %%
import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import bn_jax

np.set_printoptions(precision=4, suppress=True)
print(jax.device_count(), "devices:", jax.devices()[:2], "...")

# %% [markdown]
# ## The data
#
# A global batch of 64 examples with 16 features, split over 8 devices (8 examples
# each). To make the point visible, each device's slice comes from a different
# distribution (as happens when data is not well shuffled, or sorted by class):
# device `i` sees features with mean `i`.

# %%
rng = np.random.default_rng(0)
n_dev, per_dev, C = 8, 8, 16
x_global = np.concatenate([rng.normal(i, 1.0, size=(per_dev, C)) for i in range(n_dev)]).astype(np.float32)
w = rng.normal(size=(n_dev * per_dev, C)).astype(np.float32)  # weights of a toy loss

norm = bn_jax.BatchNorm(momentum=0.9)
params, state = norm.init(C)
params = {"scale": jnp.linspace(0.5, 1.5, C), "bias": jnp.linspace(-1, 1, C)}


def loss_single(params, x):
    y, _ = norm.apply(params, state, x, training=True)
    return jnp.sum(w * y)


# The reference: one device, the whole batch.
y_ref, state_ref = jax.jit(lambda p, s, x: norm.apply(p, s, x, training=True))(params, state, x_global)
g_ref = jax.jit(jax.grad(loss_single, argnums=(0, 1)))(params, x_global)
print("global batch mean of feature 0:", float(x_global[:, 0].mean()))

# %% [markdown]
# ## `shard_map` (the main path)
#
# Inside `shard_map`, each device sees its slice `[8, 16]`. `axis_name="batch"` makes
# BatchNorm pool the statistics over the mapped axis: one `all_gather` of each device's
# `(count, mean, M2)` (3 × 16 numbers) and Chan's pairwise merge, which is exact and
# weighted by count.

# %%
mesh = jax.make_mesh((n_dev,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
sync = bn_jax.BatchNorm(momentum=0.9, axis_name="batch")
local = bn_jax.BatchNorm(momentum=0.9)  # no axis_name: each device's own statistics


def sharded_apply(layer):
    def f(params, state, x):
        return layer.apply(params, state, x, training=True)

    return jax.jit(
        jax.shard_map(
            f, mesh=mesh, in_specs=(P(), P(), P("batch")), out_specs=(P("batch"), P()), check_vma=False
        )
    )


y_sync, state_sync = sharded_apply(sync)(params, state, x_global)
print("synced BN, max |y - single device|           :", float(jnp.abs(y_sync - y_ref).max()))
print("synced BN, max |running mean - single device|:", float(jnp.abs(state_sync["mean"] - state_ref["mean"]).max()))
print("synced BN, max |running var  - single device|:", float(jnp.abs(state_sync["var"] - state_ref["var"]).max()))

y_local, state_local = sharded_apply(local)(params, state, x_global)
print("per-device BN, max |y - single device|       :", float(jnp.abs(y_local - y_ref).max()))

# %% [markdown]
# Synchronized BatchNorm reproduces the single-device result to float32 rounding.
# Per-device BatchNorm does not: each device subtracts its own mean (`i`), erasing
# exactly the between-device differences the model should see. (The per-device
# running statistics are not even the same on every device, which is why `out_specs`
# for them is only `P()` when `check_vma=False`; with `axis_name` they are
# identical everywhere by construction.)
#
# Gradients flow through the collective as well: the backward pass adds one more
# collective of `2 × 16` numbers (the fused `sum(g)`, `sum(g * x_hat)`).

# %%
def loss_sharded(params, x):
    def f(params, x):
        y, _ = sync.apply(params, state, x, training=True)
        return y

    y = jax.shard_map(f, mesh=mesh, in_specs=(P(), P("batch")), out_specs=P("batch"))(params, x)
    return jnp.sum(w * y)


g_sh = jax.jit(jax.grad(loss_sharded, argnums=(0, 1)))(params, x_global)
diffs = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), g_sh, g_ref)
print("max |grad - single-device grad|  scale:", diffs[0]["scale"], " bias:", diffs[0]["bias"], " x:", diffs[1])

# %% [markdown]
# How much does it communicate? The compiled program for one training-mode forward
# and backward pass of one layer:

# %%
hlo = jax.jit(jax.grad(loss_sharded, argnums=(0, 1))).lower(params, x_global).compile().as_text()
for op in ("all-gather", "all-reduce", "all-to-all", "collective-permute"):
    print(f"{op:18s}: {hlo.count(op + '(') + hlo.count(op + '-start(')}")

# %% [markdown]
# One `all-gather` in the forward pass (the `3 × 16` moments) and one `all-reduce` in
# the backward pass (the `2 × 16` gradient sums), whatever the number of devices.

# %% [markdown]
# ## `pmap`
#
# `pmap` is legacy in recent JAX (it is built on `jit` + `shard_map`), but plenty of
# code still uses it. The same `axis_name` works; the batch gets a leading device axis.

# %%
y_pmap, state_pmap = jax.pmap(
    lambda x: sync.apply(params, state, x, training=True), axis_name="batch"
)(x_global.reshape(n_dev, per_dev, C))
print("pmap, max |y - single device|          :", float(jnp.abs(y_pmap.reshape(-1, C) - y_ref).max()))
print("pmap, running mean identical on devices:", bool(jnp.all(state_pmap["mean"] == state_pmap["mean"][0])))
print("pmap, max |running mean - single device|:", float(jnp.abs(state_pmap["mean"][0] - state_ref["mean"]).max()))

# %% [markdown]
# ## Masks with uneven counts
#
# Padding is common: the last batch of an epoch, variable-length sequences, examples
# dropped per device. A `mask` marks the elements that count. Here device `i` has
# `i + 1` valid examples out of 8 (36 of 64 in all).
#
# The correct global statistics pool the 36 valid rows, so a device with 8 valid rows
# weighs 8 times as much as a device with one. Averaging each device's masked mean
# with equal weights (what a `pmean` of per-device masked means does; Flax's
# BatchNorm does this) gives a different, wrong answer.

# %%
valid = np.concatenate([np.arange(per_dev) < i + 1 for i in range(n_dev)])  # [64]
mask = valid[:, None]  # broadcasts over features

sync_stats = bn_jax.BatchNorm(momentum=0.0, axis_name="batch")  # momentum 0: state = batch stats
y_m, state_m = jax.jit(
    jax.shard_map(
        lambda x, m: sync_stats.apply(params, state, x, training=True, mask=m),
        mesh=mesh, in_specs=(P("batch"), P("batch")), out_specs=(P("batch"), P()),
    )
)(x_global, mask)

kept = x_global[valid].astype(np.float64)
pooled_mean = kept.mean(0)
naive_mean = np.mean([x_global[i * per_dev:(i + 1) * per_dev][valid[i * per_dev:(i + 1) * per_dev]].mean(0) for i in range(n_dev)], 0)
batch_mean_bn = np.asarray(state_m["mean"])
print("valid rows per device:", valid.reshape(n_dev, per_dev).sum(1))
print("pooled mean of valid rows, feature 0 (float64):", pooled_mean[0])
print("bn_jax batch mean, feature 0                  :", batch_mean_bn[0])
print("equal-weight average of per-device means      :", naive_mean[0])
print("bn_jax max |batch mean - pooled| over features:", float(np.abs(batch_mean_bn - pooled_mean).max()))
y_valid_ref = (kept - pooled_mean) / np.sqrt(kept.var(0) + 1e-5) * np.asarray(params["scale"]) + np.asarray(params["bias"])
print("bn_jax max |y - reference| on valid rows      :", float(np.abs(np.asarray(y_m)[valid] - y_valid_ref).max()))

# %% [markdown]
# ## Sub-groups: `axis_index_groups`
#
# Synchronizing 8 devices in two groups of 4 (for example, to keep communication
# within one host) gives each group the statistics of its own 32 examples.

# %%
grouped = bn_jax.BatchNorm(momentum=0.9, axis_name="batch", axis_index_groups=((0, 1, 2, 3), (4, 5, 6, 7)))
y_g, _ = sharded_apply(grouped)(params, state, x_global)
for g in range(2):
    half = slice(32 * g, 32 * (g + 1))
    y_half, _ = norm.apply(params, state, x_global[half], training=True)
    print(f"group {g}: max |y - single-device BN on its 32 rows| = {float(jnp.abs(y_g[half] - y_half).max()):.2e}")

# %% [markdown]
# ## No `axis_name` at all: `jit` over a sharded global array
#
# With JAX's global arrays, `jit` sees the whole batch even though it is laid out
# across devices; the compiler inserts the reductions. The plain layer already *is*
# the global BatchNorm here.

# %%
x_sharded = jax.device_put(x_global, NamedSharding(mesh, P("batch")))
y_jit, state_jit = jax.jit(lambda x: norm.apply(params, state, x, training=True))(x_sharded)
print("input sharding :", x_sharded.sharding.spec, "| output sharding:", y_jit.sharding.spec)
print("max |y - single device|:", float(jnp.abs(y_jit - y_ref).max()))

# %% [markdown]
# **Summary.** Use `axis_name` under `shard_map`/`pmap` (or `vmap`), or no `axis_name`
# with a batch-sharded global array under `jit`. Either way the result is the
# BatchNorm of the global batch, masks are weighted by their counts, and the forward
# pass costs one collective per layer.
