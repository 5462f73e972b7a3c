"""bn_jax: Batch Normalization done right for JAX.

Every normalizer is a frozen, hashable configuration object with pure
``init`` and ``apply``::

    norm = bn_jax.BatchNorm()
    params, state = norm.init(num_features)
    y, state = norm.apply(params, state, x, training=True)
"""

from bn_jax.norms.batch_norm import BatchNorm
from bn_jax.norms.batch_norm import batch_norm

__version__ = "0.1.0"

__all__ = [
    "BatchNorm",
    "batch_norm",
]
