"""torch_ref: the PyTorch reference. Same models, names and recipes as ``jaxlight``, file for file.

It is the yardstick the JAX side is checked against, so it stays faithful to the tutorial it
grew from (``DataLoader`` over ``torchvision.datasets.MNIST`` with ``ToTensor``), and adds an
in-memory path only for fair speed comparisons.
"""

from torch_ref import data, loop, models, optim, tasks
from torch_ref.models import MODELS, build_model, count_params

__all__ = ["MODELS", "build_model", "count_params", "data", "loop", "models", "optim", "tasks"]
