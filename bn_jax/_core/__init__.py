"""The functional kernel of bn_jax: statistics, normalization, running statistics.

Every normalizer in :mod:`bn_jax.norms` is built from these pieces; nothing
here imports flax.
"""
