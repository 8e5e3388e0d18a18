"""torch_ref: the PyTorch reference. Same models, names and recipes as ``jaxlight``, file for file.

It is the yardstick the JAX side is checked against, so it stays faithful to the tutorial it
grew from (``DataLoader`` over ``torchvision.datasets.MNIST`` with ``ToTensor``), and adds an
in-memory path only for fair speed comparisons.

It imports only public ``jaxlight`` names (the MNIST files, the data order, the recipes), and
``jaxlight`` imports it only from ``jaxlight.bridge``, so the packages depend one way.
"""

import importlib

# Imported on first use (PEP 562), so that ``torch-ref train`` installs its signal handlers
# before torch is imported (see torch_ref/cli.py).
_SUBMODULES = ("data", "loop", "models", "optim", "tasks")
_NAMES = {"MODELS": "torch_ref.models", "build_model": "torch_ref.models", "count_params": "torch_ref.models"}


def __getattr__(name: str):
    if name in _SUBMODULES:
        value = importlib.import_module(f"torch_ref.{name}")
    elif name in _NAMES:
        value = getattr(importlib.import_module(_NAMES[name]), name)
    else:
        raise AttributeError(f"module 'torch_ref' has no attribute {name!r}")
    globals()[name] = value
    return value

__all__ = ["MODELS", "build_model", "count_params", "data", "loop", "models", "optim", "tasks"]
