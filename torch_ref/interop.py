"""The torch side of ``jaxlight.interop``: ``state_dict`` and optimizer state <-> numpy.

``jaxlight.interop`` converts between PyTorch's layout and jaxlight's on numpy arrays; this
module only moves tensors in and out of torch, with PyTorch's names. Together:

    >>> import torch_ref, jaxlight
    >>> from flax import nnx
    >>> from jaxlight import interop
    >>> from torch_ref.interop import state_dict_to_numpy
    >>> tmodel = torch_ref.build_model("cnn", seed=0)
    >>> template = nnx.state(jaxlight.build_model("cnn"), nnx.Param)
    >>> params = interop.params_from_torch(state_dict_to_numpy(tmodel), template, "cnn")

The optimizer format is ``{"step": int | None, "slots": {slot: {param_name: np.ndarray}}}``
(see ``jaxlight.interop``). PyTorch stores optimizer state by parameter *index*; the names
come from ``model.named_parameters()``, which is the order ``model.parameters()`` hands the
optimizer.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from jaxlight.interop import SLOTS, ConversionError

__all__ = ["state_dict_to_numpy", "load_numpy_state_dict", "optimizer_to_numpy", "load_numpy_optimizer",
           "grads_to_numpy"]


def state_dict_to_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """``{name: np.ndarray}`` copies of the model's ``state_dict`` (PyTorch layout)."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def grads_to_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """``{name: grad}`` of every trainable parameter (zeros where ``.grad`` is None)."""
    return {n: (p.grad.detach().cpu().numpy().copy() if p.grad is not None else np.zeros(tuple(p.shape), np.float32))
            for n, p in model.named_parameters() if p.requires_grad}


def load_numpy_state_dict(model: torch.nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Copy ``{name: np.ndarray}`` into the model in place, checking every key, shape and dtype.

    BatchNorm's ``num_batches_tracked`` may be absent (``jaxlight.interop.model_to_torch`` has
    no such counter): the module keeps its own. It only matters for ``momentum=None``, which
    ``jaxlight.interop.derive_layout`` refuses.

    Raises:
        ConversionError: unknown or missing keys, or a shape/dtype that differs, naming it.
    """
    own = model.state_dict()
    unknown = [k for k in arrays if k not in own]
    missing = [k for k in own if k not in arrays and not k.endswith("num_batches_tracked")]
    if unknown or missing:
        raise ConversionError(f"state_dict for {type(model).__name__}: "
                              + "; ".join(p for p in (unknown and f"unknown key(s) {unknown}",
                                                      missing and f"missing key(s) {missing}") if p))
    tensors = {}
    for name, ref in own.items():
        if name not in arrays:  # num_batches_tracked: keep the module's own
            tensors[name] = ref.clone()
            continue
        a = np.asarray(arrays[name])
        if tuple(a.shape) != tuple(ref.shape):
            raise ConversionError(f"{name}: shape {tuple(a.shape)}, but {type(model).__name__} expects {tuple(ref.shape)}")
        t = torch.from_numpy(np.array(a))  # a writable copy: torch must own it
        if t.dtype != ref.dtype:
            raise ConversionError(f"{name}: dtype {t.dtype}, but {type(model).__name__} expects {ref.dtype}")
        tensors[name] = t
    model.load_state_dict(tensors, strict=True)


def _index_to_name(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict[int, str]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    names = {}
    index = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in by_id:
                raise ConversionError(f"the optimizer holds a parameter of shape {tuple(p.shape)} that is not in "
                                      f"{type(model).__name__}")
            names[index] = by_id[id(p)]
            index += 1
    return names


def optimizer_to_numpy(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict:
    """A torch optimizer's state as ``{"step": int | None, "slots": {slot: {name: array}}}``.

    Adam/AdamW keep ``step`` per parameter; they are all equal after ordinary training (if not,
    this raises, as optax keeps one count). Unsupported state (``max_exp_avg_sq`` from amsgrad)
    raises rather than being dropped.
    """
    sd = optimizer.state_dict()
    names = _index_to_name(optimizer, model)
    slots: dict[str, dict[str, np.ndarray]] = {}
    steps = {}
    for index, pstate in sd["state"].items():
        name = names[index]
        for key, value in pstate.items():
            if key == "step":
                steps[name] = int(float(value))
            elif key in SLOTS:
                if value is not None:
                    slots.setdefault(key, {})[name] = value.detach().cpu().numpy().copy()
            else:
                raise ConversionError(f"{name}: optimizer state {key!r} has no jaxlight equivalent "
                                      f"(supported: {sorted(SLOTS)} and 'step')")
    if len(set(steps.values())) > 1:
        raise ConversionError(f"parameters are at different Adam steps: {steps}")
    return {"step": next(iter(steps.values())) if steps else None, "slots": slots}


def load_numpy_optimizer(optimizer: torch.optim.Optimizer, model: torch.nn.Module, state: Mapping) -> None:
    """Load ``{"step", "slots"}`` into a torch optimizer built over ``model.parameters()``.

    Adam/AdamW get ``step`` as the float32 scalar tensor PyTorch keeps (exact for counts below
    2**24); hyperparameters (lr, betas, ...) stay the optimizer's own.
    """
    names = _index_to_name(optimizer, model)
    index_of = {n: i for i, n in names.items()}
    shapes = dict((n, tuple(p.shape)) for n, p in model.named_parameters())
    is_adam = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))
    expected_slots = {"exp_avg", "exp_avg_sq"} if is_adam else {"momentum_buffer"}
    unknown = sorted(set(state.get("slots", {})) - expected_slots)
    if unknown:
        raise ConversionError(f"optimizer state slot(s) {unknown} do not exist in {type(optimizer).__name__} "
                              f"(expects {sorted(expected_slots)})")
    per_param: dict[int, dict] = {}
    for slot, arrays in state.get("slots", {}).items():
        bad = sorted(set(arrays) - set(index_of))
        missing = sorted(set(index_of) - set(arrays))
        if bad or missing:
            raise ConversionError(f"optimizer slot {slot!r}: "
                                  + "; ".join(p for p in (bad and f"unknown parameter(s) {bad}",
                                                          missing and f"missing parameter(s) {missing}") if p))
        for name, a in arrays.items():
            if tuple(np.shape(a)) != shapes[name]:
                raise ConversionError(f"optimizer slot {slot!r} for {name}: shape {tuple(np.shape(a))}, "
                                      f"expected {shapes[name]}")
            per_param.setdefault(index_of[name], {})[slot] = torch.from_numpy(np.array(a))
    if is_adam and per_param:
        if state.get("step") is None:
            raise ConversionError("Adam/AdamW state needs 'step' (the bias-correction count)")
        for entry in per_param.values():
            entry["step"] = torch.tensor(float(state["step"]), dtype=torch.float32)
    sd = optimizer.state_dict()
    sd["state"] = per_param
    optimizer.load_state_dict(sd)
