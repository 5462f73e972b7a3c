"""bn_jax's benchmarks, run from the repository root of a clone (not installed with bn_jax).

``python -m benchmarks`` times single BatchNorm layers against Flax (and Haiku,
Equinox); ``python -m benchmarks --models`` times a training step of whole
models. ``--help`` lists the options; ``pip install -e '.[bench]'`` installs
what they need.

- :mod:`benchmarks.cli`: the command line and the reports.
- :mod:`benchmarks.layers`: single layers, the elementwise floor, the
  bytes-moved bound and the fewest-pass program.
- :mod:`benchmarks.libraries`: the layers under test, one calling convention.
- :mod:`benchmarks.models`: the model rows (ResNet-18/50, a BatchNorm MLP,
  transformer language models) and their training step.
- :mod:`benchmarks.timing`: interleaved timing, shared by both.
"""
