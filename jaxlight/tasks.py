"""Loss functions: the unit of customisation, and the three built-in ones.

A loss function is what a user writes, as ``training_step`` is in Lightning::

    def loss_fn(model, batch) -> (losses, metrics)

- ``model`` is the live NNX module, in train mode inside training steps and in eval mode inside
  evaluation and prediction (jaxlight switches; the function never has to).
- ``batch`` is any pytree of arrays (dicts, tuples, nested) whose leaves share the leading
  batch axis ``B``.
- ``losses`` has shape ``(B,)``, one loss per example; ``metrics`` is a dict of ``(B,)`` arrays
  (the names are the user's; "loss" and "count" are jaxlight's).

jaxlight takes the masked means over the real examples (the last batch of an epoch is padded
to a fixed shape; see ``jaxlight.data.arrays``), across batches, chunks and devices, so the
loss that is differentiated is exactly the mean over the real examples of the batch, as
PyTorch's ``reduction="mean"`` gives on the shorter last batch of a ``DataLoader``.

A loss that is not a mean over examples (a contrastive loss, which compares every example with
every other) declares a ``mask`` parameter: ``loss_fn(model, batch, mask)``. It then receives
the padding mask, ``(B,)`` float32, 1.0 for real rows and 0.0 for padding, must leave the
padding out itself, and may return a scalar loss and scalar metrics. jaxlight uses a scalar as
the batch's value and weights it by the batch's number of real examples when it averages over
the batches of an epoch (and over devices under ``pmap``).

The built-in tasks are such functions over ``batch = {"x", "y"}``: :func:`multiclass`,
:func:`binary`, :func:`regression`. They keep the ``torch.nn`` loss they match and check their
labels (:meth:`Task.check`).
"""

from __future__ import annotations

import contextvars
import inspect
from dataclasses import dataclass
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np
import optax

from jaxlight.errors import BatchError

__all__ = ["LossFn", "Task", "compute_dtype", "regression", "binary", "multiclass", "TASKS", "loss_name", "takes_mask",
           "prepare_x"]

LossFn = Callable[..., tuple[Any, dict]]
"""``loss_fn(model, batch) -> (losses (B,), {name: (B,)})``, or with ``mask`` (see above)."""


_COMPUTE_DTYPE: contextvars.ContextVar = contextvars.ContextVar("jaxlight_compute_dtype", default=None)


def compute_dtype():
    """The step's compute dtype while a loss is traced (None, or ``jnp.bfloat16`` under bf16).

    A loss function that builds floats of its own (e.g. from integer inputs) casts them to it.
    """
    return _COMPUTE_DTYPE.get()


def prepare_x(x, dtype=None):
    """Images to the models' input: uint8 ``(B, 28, 28)`` -> float32 in [0, 1].

    Divides by 255 exactly as torchvision's ``ToTensor`` does (``x / 255``, not ``x * (1/255)``,
    which differs in the last bit), so both frameworks feed their models the same floats.
    Float inputs pass through as float32. ``dtype`` (bf16 mixed precision) casts the result.
    """
    x = x.astype(jnp.float32) / 255.0 if x.dtype == jnp.uint8 else x.astype(jnp.float32)
    return x if dtype is None else x.astype(dtype)


def takes_mask(loss_fn: Callable) -> bool:
    """Whether ``loss_fn`` declares a ``mask`` parameter (then it handles padding itself)."""
    try:
        return "mask" in inspect.signature(loss_fn).parameters
    except (TypeError, ValueError):  # builtins and some C callables have no signature
        return False


def loss_name(loss_fn: Callable) -> str:
    """A stable name for logs, metrics.json and checkpoints: a task's name, else the function's
    qualified name."""
    if isinstance(loss_fn, Task):
        return loss_fn.name
    module = getattr(loss_fn, "__module__", None) or ""
    name = getattr(loss_fn, "__qualname__", None) or type(loss_fn).__qualname__
    return f"{module}.{name}" if module else name


@dataclass(frozen=True)
class Task:
    """A built-in loss function over ``batch = {"x": inputs, "y": labels}``.

    Calling it is the loss-function contract: ``task(model, batch) -> (losses (B,),
    {metric: (B,)})``. ``x`` may be uint8 images (scaled by 1/255 inside, as ``ToTensor``) or
    floats.

    Attributes:
        name: "regression", "binary" or "multiclass".
        metric: the metric's name in logs and ``metrics.json``: "mse" or "accuracy".
        per_example_loss: ``(outputs (B, K), y) -> (B,)``.
        per_example_score: ``(outputs, y) -> (B,)``: squared error, or 1.0 for a correct label.
        num_classes: labels must lie in ``[0, num_classes)``; None for regression.
        label_dtype: the dtype ``y`` must have (int32 labels, float32 targets).
    """

    name: str
    metric: str
    per_example_loss: Callable
    per_example_score: Callable
    num_classes: int | None
    label_dtype: np.dtype

    def __call__(self, model, batch):
        outputs = self.predict(model, batch)
        return self.per_example_loss(outputs, batch["y"]), {self.metric: self.per_example_score(outputs, batch["y"])}

    def predict(self, model, batch):
        """The model's float32 outputs for ``batch["x"]`` (what ``Trainer.predict`` returns)."""
        return model(prepare_x(batch["x"], compute_dtype())).astype(jnp.float32)

    def check(self, batch, input_shape: tuple | None = None, where: str = "batch") -> None:
        """Shapes, dtypes and (for host numpy labels) label values, naming the culprit.

        Raises:
            jaxlight.step.BatchError: what is wrong, e.g. ``batch['y'][2] = 10 is outside [0, 10)``.
        """
        if not isinstance(batch, dict) or not {"x", "y"} <= set(batch):
            raise BatchError(f"the {self.name} task takes a batch dict with keys 'x' and 'y', got "
                             f"{type(batch).__name__}" + (f" with keys {sorted(batch)}" if isinstance(batch, dict) else ""))
        x, y = batch["x"], batch["y"]
        for name, arr in (("x", x), ("y", y)):
            if not hasattr(arr, "shape") or not hasattr(arr, "dtype"):
                raise BatchError(f"{where}['{name}'] must be an array, got {type(arr).__name__}")
        if x.ndim < 1 or y.ndim < 1 or x.shape[0] != y.shape[0]:
            raise BatchError(f"{where}['x'] has shape {tuple(x.shape)} and {where}['y'] {tuple(y.shape)}: "
                             f"their first (batch) dimensions must match")
        if input_shape is not None and tuple(x.shape[1:]) != tuple(input_shape):
            raise BatchError(f"{where}['x'] has shape {tuple(x.shape)}; the model takes "
                             f"(batch, {', '.join(map(str, input_shape))})")
        if not (jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == jnp.uint8):
            raise BatchError(f"{where}['x'] has dtype {x.dtype}; expected uint8 images or floats")
        if self.num_classes is not None:
            if not jnp.issubdtype(y.dtype, jnp.integer) or y.ndim != 1:
                raise BatchError(f"{where}['y'] has dtype {y.dtype} and shape {tuple(y.shape)}; a "
                                 f"{self.name} task takes (batch,) integer labels")
            if isinstance(y, np.ndarray) and y.size and (y.min() < 0 or y.max() >= self.num_classes):
                bad = int(np.argmax((y < 0) | (y >= self.num_classes)))
                raise BatchError(f"{where}['y'][{bad}] = {int(y[bad])} is outside [0, {self.num_classes}) "
                                 f"for the {self.name} task")
        elif not jnp.issubdtype(y.dtype, jnp.floating):
            raise BatchError(f"{where}['y'] has dtype {y.dtype}; a regression task takes float targets")

    def cast_labels(self, batch):
        """Host integer labels to the task's dtype (int64 numpy labels are common)."""
        y = batch["y"]
        if self.num_classes is not None and isinstance(y, np.ndarray) and y.dtype != self.label_dtype:
            batch = {**batch, "y": y.astype(self.label_dtype)}
        return batch


def _mse(outputs, y):
    return jnp.mean(optax.squared_error(outputs, y.astype(outputs.dtype)), axis=-1)


def _binary_loss(outputs, y):
    return optax.sigmoid_binary_cross_entropy(outputs[:, 0], y.astype(outputs.dtype))


def _binary_correct(outputs, y):
    return ((outputs[:, 0] > 0).astype(jnp.int32) == y).astype(jnp.float32)


def _multiclass_loss(outputs, y):
    return optax.softmax_cross_entropy_with_integer_labels(outputs.astype(jnp.float32), y)


def _multiclass_correct(outputs, y):
    return (jnp.argmax(outputs, axis=-1) == y).astype(jnp.float32)


def regression() -> Task:
    """Mean squared error (``torch.nn.MSELoss``); metric "mse"."""
    return Task("regression", "mse", _mse, _mse, None, np.dtype(np.float32))


def binary() -> Task:
    """Sigmoid cross-entropy on one logit (``torch.nn.BCEWithLogitsLoss``); labels 0/1."""
    return Task("binary", "accuracy", _binary_loss, _binary_correct, 2, np.dtype(np.int32))


def multiclass(num_classes: int = 10) -> Task:
    """Softmax cross-entropy on integer labels (``torch.nn.CrossEntropyLoss``)."""
    return Task("multiclass", "accuracy", _multiclass_loss, _multiclass_correct, num_classes, np.dtype(np.int32))


TASKS = {"regression": regression, "binary": binary, "multiclass": multiclass}

