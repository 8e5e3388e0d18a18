"""Optimizers by name, built from the same arguments as ``jaxlight.optim`` (see its docstring
for how the two libraries' names are mapped: AdamW's default decay, L2 vs decoupled decay)."""

from __future__ import annotations

import torch

__all__ = ["OPTIMIZERS", "make_optimizer"]


def adam(params, lr, weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, **_):
    return torch.optim.Adam(params, lr=lr, betas=(b1, b2), eps=eps, weight_decay=weight_decay)


def adamw(params, lr, weight_decay: float = 0.01, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, **_):
    return torch.optim.AdamW(params, lr=lr, betas=(b1, b2), eps=eps, weight_decay=weight_decay)


def sgd(params, lr, momentum: float = 0.0, weight_decay: float = 0.0, **_):
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


OPTIMIZERS = {"adam": adam, "adamw": adamw, "sgd": sgd}


def make_optimizer(name: str, params, lr, **kwargs) -> torch.optim.Optimizer:
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[name](params, lr, **kwargs)
