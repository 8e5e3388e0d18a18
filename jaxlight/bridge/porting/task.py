"""The losses a port's report uses by default, and the data a saved port fine-tunes on by default.

A port's batch is ``{"inputs": (x1, ..., xn), "target": target}``: the model is called as
``model(*batch["inputs"])``, the positional arguments of the torch module's ``forward``, in its
layout (NCHW stays NCHW). Both losses keep jaxlight's loss contract, ``loss_fn(model, batch) ->
(losses (B,), metrics)``, and each has its torch twin on the same batch as tensors:

- :func:`cross_entropy` (a classifier: one output ``(B, C)``, ``C >= 2``): softmax
  cross-entropy against integer labels ``target (B,)``; metric ``accuracy``. As
  ``torch.nn.functional.cross_entropy(reduction="none")``.
- :func:`mse` (any other output): for each floating-point output leaf (tuples, lists and dicts
  are walked, dict keys in sorted order, as ``jax.tree.leaves`` does) the squared error to its
  target, averaged over every axis but the batch axis, summed over the leaves; ``target`` is a
  tuple with one array per such leaf. A leaf without the batch axis first (an RNN's final
  state ``(layers, B, H)``) adds its overall mean to every example.

Inputs that are not batch-first (a sequence-first RNN's ``(T, B, F)``, inputs whose first axes
differ) cannot be cut into rows: the whole example set is then one row of a batch of one
(every array gets a leading axis of 1), and the ``*_whole`` losses (:func:`unbatched`) take that
row apart and return the mean of the losses as the row's loss.

:func:`example_data` reads the ``examples.npz`` that ``Port.save`` writes: the example inputs
and targets as an ``ArrayDataset`` of such batches, the default ``data`` of the saved
``config.yaml``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = ["cross_entropy", "mse", "torch_cross_entropy", "torch_mse", "unbatched", "torch_unbatched",
           "cross_entropy_whole", "mse_whole", "batch_first", "example_data", "write_examples", "LOSSES"]


def _batch_size(batch) -> int:
    return jax.tree.leaves(batch["inputs"])[0].shape[0]


def cross_entropy(model, batch):
    """Softmax cross-entropy of ``model(*batch["inputs"])`` ``(B, C)`` against ``batch["target"]``
    ``(B,)`` integer labels; metric ``accuracy``."""
    logits = model(*batch["inputs"])
    labels = batch["target"]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    return losses, {"accuracy": (jnp.argmax(logits, -1) == labels).astype(jnp.float32)}


def _float_outputs(out) -> list:
    return [a for a in jax.tree.leaves(out) if jnp.issubdtype(a.dtype, jnp.floating)]


def mse(model, batch):
    """Squared error of each floating-point output leaf of ``model(*batch["inputs"])`` to its
    target in ``batch["target"]`` (a tuple, one per leaf), averaged over the non-batch axes and
    summed over the leaves: ``(B,)``."""
    outputs = _float_outputs(model(*batch["inputs"]))
    targets = tuple(batch["target"])
    if len(outputs) != len(targets):
        raise ValueError(f"mse: the model returns {len(outputs)} floating-point output(s), the batch's target holds "
                         f"{len(targets)}")
    b = _batch_size(batch)
    total = jnp.zeros((b,), jnp.float32)
    for out, target in zip(outputs, targets):
        err = jnp.square(out.astype(jnp.float32) - target)
        if err.ndim >= 1 and err.shape[0] == b:
            total = total + err.reshape(b, -1).mean(axis=1)
        else:
            total = total + jnp.mean(err)
    return total, {}


def _torch_leaves(out) -> list:
    import torch

    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [a for o in out for a in _torch_leaves(o)]
    if isinstance(out, dict):
        return [a for k in sorted(out) for a in _torch_leaves(out[k])]
    return []


def torch_cross_entropy(model, batch):
    """:func:`cross_entropy` in torch."""
    import torch.nn.functional as F

    logits = model(*batch["inputs"])
    labels = batch["target"]
    return (F.cross_entropy(logits.float(), labels, reduction="none"),
            {"accuracy": (logits.argmax(-1) == labels).float()})


def torch_mse(model, batch):
    """:func:`mse` in torch."""
    import torch

    outputs = [a for a in _torch_leaves(model(*batch["inputs"])) if a.is_floating_point()]
    targets = tuple(batch["target"])
    if len(outputs) != len(targets):
        raise ValueError(f"mse: the model returns {len(outputs)} floating-point output(s), the batch's target holds "
                         f"{len(targets)}")
    b = _torch_leaves(batch["inputs"])[0].shape[0]
    total = torch.zeros(b)
    for out, target in zip(outputs, targets):
        err = (out.float() - target) ** 2
        if err.ndim >= 1 and err.shape[0] == b:
            total = total + err.reshape(b, -1).mean(dim=1)
        else:
            total = total + err.mean()
    return total, {}


def batch_first(tree) -> bool:
    """Whether every array of ``tree`` has the same first axis (rows of one batch)."""
    leaves = jax.tree.leaves(tree)
    return all(np.ndim(a) >= 1 for a in leaves) and len({np.shape(a)[0] for a in leaves}) == 1


def unbatched(loss_fn):
    """``loss_fn`` on a batch whose every array holds the whole example set under a leading
    axis of 1: the row taken apart, the mean of its losses as the row's loss ``(1,)``."""
    def whole(model, batch):
        losses, metrics = loss_fn(model, jax.tree.map(lambda a: a[0], batch))
        return jnp.mean(losses)[None], {k: jnp.mean(v)[None] for k, v in metrics.items()}

    return whole


def torch_unbatched(torch_loss_fn):
    """:func:`unbatched` in torch."""
    def whole(model, batch):
        import jax as _jax

        losses, metrics = torch_loss_fn(model, _jax.tree.map(lambda a: a[0], batch))
        return losses.mean()[None], {k: v.float().mean()[None] for k, v in metrics.items()}

    return whole


cross_entropy_whole = unbatched(cross_entropy)
mse_whole = unbatched(mse)

# name -> (jax loss, torch loss, dotted path of the jax loss for a config)
LOSSES = {
    "cross_entropy": (cross_entropy, torch_cross_entropy, "jaxlight.bridge.porting.task.cross_entropy"),
    "mse": (mse, torch_mse, "jaxlight.bridge.porting.task.mse"),
    "cross_entropy_whole": (cross_entropy_whole, torch_unbatched(torch_cross_entropy),
                            "jaxlight.bridge.porting.task.cross_entropy_whole"),
    "mse_whole": (mse_whole, torch_unbatched(torch_mse), "jaxlight.bridge.porting.task.mse_whole"),
}


def write_examples(path, inputs: tuple, target) -> None:
    """``examples.npz``: ``input_0 ... input_{n-1}``, and ``target`` (an array) or ``target_0 ...``
    (a tuple of arrays), so that :func:`example_data` gives back the same batch structure (as one
    row of a batch of one when they are not batch-first)."""
    arrays = {f"input_{i}": np.asarray(x) for i, x in enumerate(inputs)}
    arrays["whole"] = np.asarray(not batch_first({"inputs": tuple(inputs), "target": target}))
    if isinstance(target, (tuple, list)):
        arrays.update({f"target_{i}": np.asarray(t) for i, t in enumerate(target)})
    elif target is not None:
        arrays["target"] = np.asarray(target)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def example_data(path: str):
    """The examples a port was checked on, as a training set: ``ArrayDataset({"inputs": (x1,
    ...), "target": ...})`` from the ``examples.npz`` that ``Port.save`` wrote.

    Args:
        path: the ``examples.npz`` file.
    """
    from jaxlight.data import ArrayDataset

    with np.load(path) as f:
        files = set(f.files) - {"whole"}
        inputs = tuple(np.asarray(f[f"input_{i}"]) for i in range(sum(k.startswith("input_") for k in files)))
        if "target" in files:
            target = np.asarray(f["target"])
        else:
            target = tuple(np.asarray(f[f"target_{i}"]) for i in range(sum(k.startswith("target_") for k in files)))
        whole = bool(f["whole"]) if "whole" in f.files else False
    if not inputs:
        raise ValueError(f"{path}: no input_0 array; not an examples file written by Port.save")
    tree = {"inputs": inputs, "target": target}
    return ArrayDataset(jax.tree.map(lambda a: a[None], tree) if whole else tree)
