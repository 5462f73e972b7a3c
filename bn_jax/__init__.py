"""bn_jax: Batch Normalization done right for JAX.

Every normalizer is a frozen, hashable configuration object with pure
``init`` and ``apply``::

    norm = bn_jax.BatchNorm()
    params, state = norm.init(num_features)
    y, state = norm.apply(params, state, x, training=True)
"""

from bn_jax.norms.normalizer import Normalizer
from bn_jax.norms.batch_norm import BatchNorm
from bn_jax.norms.batch_norm import batch_norm
from bn_jax.norms.batch_renorm import BatchRenorm
from bn_jax.norms.batch_renorm import batch_renorm
from bn_jax.norms.ghost_batch_norm import GhostBatchNorm
from bn_jax.norms.ghost_batch_norm import ghost_batch_norm
from bn_jax.norms.sequence_batch_norm import SequenceBatchNorm
from bn_jax.norms.sequence_batch_norm import sequence_batch_norm
from bn_jax.norms.group_norm import GroupNorm
from bn_jax.norms.group_norm import group_norm
from bn_jax.norms.instance_norm import InstanceNorm
from bn_jax.norms.instance_norm import instance_norm
from bn_jax.norms.layer_norm import LayerNorm
from bn_jax.norms.layer_norm import layer_norm
from bn_jax.norms.rms_norm import RMSNorm
from bn_jax.norms.rms_norm import rms_norm
from bn_jax.norms.filter_response_norm import FilterResponseNorm
from bn_jax.norms.filter_response_norm import filter_response_norm
from bn_jax.norms.evo_norm import EvoNormB0
from bn_jax.norms.evo_norm import evo_norm_b0
from bn_jax.norms.evo_norm import EvoNormS0
from bn_jax.norms.evo_norm import evo_norm_s0
from bn_jax.inference import fold_batch_norms
from bn_jax.inference import fold_into_conv
from bn_jax.inference import fold_into_dense
from bn_jax.inference import recalibrate
from bn_jax import interop

__version__ = "0.1.0"

__all__ = [
    "BatchNorm",
    "BatchRenorm",
    "EvoNormB0",
    "EvoNormS0",
    "FilterResponseNorm",
    "GhostBatchNorm",
    "GroupNorm",
    "InstanceNorm",
    "LayerNorm",
    "Normalizer",
    "RMSNorm",
    "SequenceBatchNorm",
    "batch_norm",
    "batch_renorm",
    "evo_norm_b0",
    "evo_norm_s0",
    "filter_response_norm",
    "fold_batch_norms",
    "fold_into_conv",
    "fold_into_dense",
    "ghost_batch_norm",
    "group_norm",
    "instance_norm",
    "interop",
    "layer_norm",
    "recalibrate",
    "rms_norm",
    "sequence_batch_norm",
]
