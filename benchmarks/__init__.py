"""Framework speed side by side: ``python -m benchmarks.run [--quick] [--out DIR]``.

Modules, in the order a run uses them: ``hardware`` (machine, versions, matmul peak), ``flops``
(FLOPs of one training step), ``variants`` (the seven ways to train, one timing interface),
``tta`` (time to a target test accuracy), ``report`` (markdown table, plots), ``run`` (the CLI).
``ab`` times fused epochs of two jaxlight checkouts against each other. See benchmarks/README.md.
"""
