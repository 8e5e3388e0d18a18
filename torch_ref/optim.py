"""Optimizers by name, built from the same arguments as ``jaxlight.optim`` (see its docstring
for how the two libraries' names are mapped: AdamW's default decay, L2 vs decoupled decay).

The names are ``jaxlight.optim.OPTIMIZERS``'s: each has its PyTorch twin here, and a name
without one fails at import.
"""

from __future__ import annotations

import torch

from jaxlight.optim import OPTIMIZERS as _NAMES
from jaxlight.optim import check_keywords

__all__ = ["OPTIMIZERS", "make_optimizer"]


def adam(params, lr, weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
    return torch.optim.Adam(params, lr=lr, betas=(b1, b2), eps=eps, weight_decay=weight_decay)


def adamw(params, lr, weight_decay: float = 0.01, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
    return torch.optim.AdamW(params, lr=lr, betas=(b1, b2), eps=eps, weight_decay=weight_decay)


def sgd(params, lr, momentum: float = 0.0, weight_decay: float = 0.0):
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


OPTIMIZERS = {name: globals()[name] for name in _NAMES}


def make_optimizer(name: str, params, lr, **kwargs) -> torch.optim.Optimizer:
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {sorted(OPTIMIZERS)}")
    check_keywords(OPTIMIZERS[name], kwargs, f"make_optimizer({name!r})", positional=2)
    return OPTIMIZERS[name](params, lr, **kwargs)
