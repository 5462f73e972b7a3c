"""PyTorch BatchNorm weights to bn_jax ``(params, state)`` and back.

A PyTorch ``nn.BatchNorm{1,2,3}d`` keeps ``weight``, ``bias``,
``running_mean``, ``running_var`` and ``num_batches_tracked``; bn_jax keeps
``params = {"scale", "bias"}`` and ``state = {"mean", "var"}`` (plus a
per-feature ``count`` with ``momentum=None``). This module converts between
them from NumPy arrays, so importing it never imports torch::

    sd = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    params, state = bn_jax.interop.from_torch(sd, prefix="layer1.0.bn1")
    norm = bn_jax.BatchNorm(axis=1, momentum=bn_jax.interop.momentum_from_torch(0.1),
                            unbiased_running_var=True)
    y, state = norm.apply(params, state, x_nchw, training=True)   # as PyTorch would

Conventions to carry over:

* **Momentum.** PyTorch's ``momentum`` is the weight of the *new* batch
  (default 0.1); bn_jax's (Flax's) is the weight of the *old* running value:
  ``momentum_from_torch(0.1) == 0.9``. PyTorch's ``momentum=None`` (cumulative
  average) is bn_jax's ``momentum=None``; pass ``cumulative=True`` to
  :func:`from_torch` to carry ``num_batches_tracked`` over as the ``count``.
* **Running variance.** PyTorch's running variance tracks the *unbiased*
  batch variance; use ``unbiased_running_var=True`` for training to continue
  exactly as in PyTorch. Normalization uses the biased variance in both.
* **Layout.** PyTorch activations are channels-first (NCHW, NCL, NCDHW): use
  ``axis=1``, or transpose the input to NHWC and keep ``axis=-1``. The
  BatchNorm vectors are per channel either way and need no transposition
  (convolution kernels do, but that is not this module's business).
* ``epsilon`` is the same number in both (PyTorch's ``eps``, default 1e-5).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "from_torch",
    "from_torch_model",
    "momentum_from_torch",
    "momentum_to_torch",
    "to_torch",
    "to_torch_model",
]

Params = dict[str, jax.Array]
State = dict[str, jax.Array]

_REQUIRED = ("running_mean", "running_var")


def momentum_from_torch(momentum: float | None) -> float | None:
    """bn_jax momentum for a PyTorch one: ``1 - momentum`` (``0.1 -> 0.9``; ``None`` stays)."""
    if momentum is None:
        return None
    _check_unit("momentum", momentum)
    return 1.0 - float(momentum)


def momentum_to_torch(momentum: float | None) -> float | None:
    """PyTorch momentum for a bn_jax one: ``1 - momentum`` (``0.9 -> 0.1``; ``None`` stays)."""
    return momentum_from_torch(momentum)


def _check_unit(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
        raise TypeError(f"{name} must be a float in [0, 1] or None, got {value!r}.")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}.")


def _prefix(prefix: str) -> str:
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str, got {type(prefix).__name__}.")
    return prefix if prefix == "" or prefix.endswith(".") else prefix + "."


def _array(state_dict: Mapping[str, Any], key: str) -> np.ndarray:
    value = state_dict[key]
    try:
        return np.asarray(value)
    except (TypeError, RuntimeError) as e:
        raise TypeError(
            f"state_dict[{key!r}] could not be read as a NumPy array ({e}); pass NumPy "
            f"arrays, e.g. {{k: v.detach().cpu().numpy() for k, v in sd.items()}}."
        ) from None


def from_torch(
    state_dict: Mapping[str, Any],
    prefix: str = "",
    *,
    cumulative: bool = False,
) -> tuple[Params, State]:
    """PyTorch BatchNorm weights to bn_jax ``(params, state)``.

    ``weight -> params["scale"]``, ``bias -> params["bias"]``,
    ``running_mean -> state["mean"]``, ``running_var -> state["var"]``.
    A layer built with ``affine=False`` gives ``params == {}`` (use
    ``use_scale=False, use_bias=False``). Running statistics are kept in at
    least float32; parameters keep their dtype.

    Args:
      state_dict: a mapping of names to NumPy arrays (a PyTorch
        ``state_dict()`` converted with ``.numpy()``); may hold a whole model.
      prefix: the layer's name in ``state_dict`` (``"layer1.0.bn1"`` or
        ``"layer1.0.bn1."``); ``""`` for a state dict of the layer alone.
      cumulative: the bn_jax layer uses ``momentum=None`` (PyTorch's
        ``momentum=None``): add ``state["count"]``, the per-feature number of
        batches seen, from ``num_batches_tracked``.

    Returns:
      ``(params, state)`` of ``jax.Array``, ready for ``bn_jax.BatchNorm.apply``.

    Raises:
      KeyError: ``running_mean`` / ``running_var`` missing under ``prefix``.
      ValueError: inconsistent shapes, or ``weight`` without ``bias``.

    Example::

        sd = {k: v.numpy() for k, v in torch_bn.state_dict().items()}
        params, state = from_torch(sd)
        norm = bn_jax.BatchNorm(axis=1, momentum=momentum_from_torch(torch_bn.momentum),
                                epsilon=torch_bn.eps, unbiased_running_var=True)
    """
    p = _prefix(prefix)
    missing = [p + k for k in _REQUIRED if p + k not in state_dict]
    if missing:
        near = sorted(k for k in state_dict if k.endswith("running_mean"))[:5]
        raise KeyError(
            f"from_torch: state_dict has no {missing} (prefix={prefix!r}). A BatchNorm built "
            f"with track_running_stats=False has no running statistics to convert. "
            f"Layers with running statistics here: {near or 'none'}."
        )
    mean = _array(state_dict, p + "running_mean")
    var = _array(state_dict, p + "running_var")
    stat_dt = np.promote_types(mean.dtype, np.float32)
    if mean.shape != var.shape or mean.ndim != 1:
        raise ValueError(
            f"from_torch: {p}running_mean has shape {mean.shape} and {p}running_var "
            f"{var.shape}; expected two vectors of the same length."
        )
    params: Params = {}
    has_w, has_b = p + "weight" in state_dict, p + "bias" in state_dict
    if has_w != has_b:
        raise ValueError(
            f"from_torch: {p}weight and {p}bias must both be present (affine=True) or both "
            f"absent (affine=False); found only {p + ('weight' if has_w else 'bias')}."
        )
    if has_w:
        for torch_name, name in (("weight", "scale"), ("bias", "bias")):
            v = _array(state_dict, p + torch_name)
            if v.shape != mean.shape:
                raise ValueError(
                    f"from_torch: {p}{torch_name} has shape {v.shape} but {p}running_mean "
                    f"has {mean.shape}."
                )
            params[name] = jnp.asarray(v)
    state: State = {
        "mean": jnp.asarray(mean.astype(stat_dt)),
        "var": jnp.asarray(var.astype(stat_dt)),
    }
    if cumulative:
        key = p + "num_batches_tracked"
        n = int(_array(state_dict, key)) if key in state_dict else 0
        state["count"] = jnp.full(mean.shape, n, jnp.int32)
    return params, state


def to_torch(
    params: Mapping[str, Any],
    state: Mapping[str, Any],
    prefix: str = "",
    *,
    num_batches_tracked: int | None = None,
) -> dict[str, np.ndarray]:
    """bn_jax ``(params, state)`` to a PyTorch BatchNorm state dict of NumPy arrays.

    Load with ``torch_bn.load_state_dict({k: torch.from_numpy(v) for k, v in
    sd.items()})``. With neither ``scale`` nor ``bias`` the result has no
    ``weight`` / ``bias`` (PyTorch's ``affine=False``); with only one, the
    other is filled with its neutral value (ones / zeros), which gives the
    same output.

    Args:
      params: ``{"scale", "bias"}`` (either may be absent).
      state: ``{"mean", "var"}`` and optionally ``"count"`` (``momentum=None``).
      prefix: prepended to every key (``"layer1.0.bn1"`` gives
        ``"layer1.0.bn1.weight"``, ...).
      num_batches_tracked: PyTorch's step counter; by default the largest
        ``state["count"]`` if present (counts differ between channels only
        after a channel skipped a non-finite batch), else 0. PyTorch reads it
        only with ``momentum=None``.

    Returns:
      ``{"weight", "bias", "running_mean", "running_var",
      "num_batches_tracked"}`` (with ``prefix``) as NumPy arrays.
    """
    p = _prefix(prefix)
    for key in ("mean", "var"):
        if key not in state:
            raise KeyError(
                f"to_torch: state has no {key!r} (keys: {sorted(state)}); pass the state of "
                f"a BatchNorm-like layer."
            )
    mean = np.asarray(state["mean"])
    out: dict[str, np.ndarray] = {}
    scale, bias = params.get("scale"), params.get("bias")
    if scale is not None or bias is not None:
        dt = np.asarray(scale if scale is not None else bias).dtype
        out[p + "weight"] = (
            np.asarray(scale) if scale is not None else np.ones(mean.shape, dt)
        ).copy()
        out[p + "bias"] = (
            np.asarray(bias) if bias is not None else np.zeros(mean.shape, dt)
        ).copy()
    out[p + "running_mean"] = np.array(mean)
    out[p + "running_var"] = np.array(state["var"])
    if num_batches_tracked is None:
        count = state.get("count")
        num_batches_tracked = int(np.max(np.asarray(count))) if count is not None else 0
    out[p + "num_batches_tracked"] = np.asarray(num_batches_tracked, np.int64)
    return out


def from_torch_model(
    state_dict: Mapping[str, Any],
    *,
    rename: Callable[[str], str] | None = None,
    cumulative: bool = False,
) -> dict[str, tuple[Params, State]]:
    """Every BatchNorm layer of a PyTorch model's state dict, by name.

    A layer is any prefix ``p`` for which ``p + "running_mean"`` and
    ``p + "running_var"`` are in ``state_dict`` (``nn.BatchNorm{1,2,3}d``,
    ``nn.SyncBatchNorm``, and ``InstanceNorm`` with
    ``track_running_stats=True``).

    Args:
      state_dict: a whole model's state dict of NumPy arrays.
      rename: maps a PyTorch layer name (``"layer1.0.bn1"``) to the key used
        in the result (e.g. the Flax module name); identity by default.
      cumulative: as in :func:`from_torch`.

    Returns:
      ``{name: (params, state)}``. To place them in Flax variables, e.g.
      ``variables["params"][name] = params`` and
      ``variables["batch_stats"][name] = state``.
    """
    suffix = "running_mean"
    layers: dict[str, tuple[Params, State]] = {}
    for key in state_dict:
        if not key.endswith(suffix):
            continue
        p = key[: -len(suffix)]
        if p + "running_var" not in state_dict:
            continue
        name = p[:-1] if p.endswith(".") else p
        out_name = rename(name) if rename is not None else name
        if out_name in layers:
            raise ValueError(
                f"from_torch_model: rename maps two layers to {out_name!r}; make it one-to-one."
            )
        layers[out_name] = from_torch(state_dict, p, cumulative=cumulative)
    return layers


def to_torch_model(
    layers: Mapping[str, tuple[Mapping[str, Any], Mapping[str, Any]]],
) -> dict[str, np.ndarray]:
    """Inverse of :func:`from_torch_model`: ``{name: (params, state)}`` to one state dict.

    Each layer's keys are prefixed with its name (``"layer1.0.bn1.weight"``,
    ...). Merge the result into the rest of a model's state dict and load
    it with ``load_state_dict``.
    """
    out: dict[str, np.ndarray] = {}
    for name, (params, state) in layers.items():
        out.update(to_torch(params, state, name))
    return out
