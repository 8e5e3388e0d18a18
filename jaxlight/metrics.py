"""Epoch-level metrics: sufficient statistics summed over the whole split, the value at the end.

A metric that is a mean of per-example values (accuracy, a loss) is a ``(B,)`` array in the
loss's metrics dict, and jaxlight averages it over the real examples. F1, precision, recall or
a confusion matrix are not such means: the mean of per-batch F1 scores is not the F1 of the
split, and it moves with the batch size. A :class:`Metric` in the metrics dict holds, per
example, the statistics its value is computed from; jaxlight sums them over the real rows of
every batch (padding left out), over the chunks of an epoch and over the devices, and computes
the value from those sums once the whole split has run (torchmetrics' ``update`` / ``compute``
in Lightning, without the object state)::

    def loss_fn(model, batch):
        logits = model(batch["x"])
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
        return losses, {"accuracy": (logits.argmax(-1) == batch["y"]).astype(jnp.float32),
                        "f1": jaxlight.metrics.F1(logits.argmax(-1), batch["y"], num_classes=10)}

The ``Trainer`` logs it as ``train_f1`` (per epoch), ``val_f1`` and ``test_f1``; ``loop.evaluate``
returns ``{"f1": ...}``. The value is the whole split's for every batch size, steps per call,
strategy and device count (the sums are integer counts: exact). Callbacks (``ModelCheckpoint``,
``EarlyStopping``) monitor that value.

Built in: :class:`F1`, :class:`Precision`, :class:`Recall` (``average="macro"``, ``"micro"``,
``"weighted"`` or ``"binary"``, as scikit-learn computes them) and :class:`ConfusionMatrix`
(a ``(C, C)`` array: returned by ``evaluate`` / ``Trainer.test``, not sent to the loggers, which
take numbers). Your own: subclass :class:`Metric`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Metric", "F1", "Precision", "Recall", "ConfusionMatrix", "SavedStats", "finish", "sum_steps", "to_json",
           "from_json", "revive"]

AVERAGES = ("macro", "micro", "weighted", "binary")


def _flatten(metric):
    config = {k: v for k, v in vars(metric).items() if k != "stats"}
    aux = tuple(sorted(config.items()))
    try:
        hash(aux)
    except TypeError:
        bad = next(k for k, v in aux if not _hashable(v))
        raise TypeError(f"{type(metric).__name__}.{bad}: a metric's settings (every attribute but stats) must be "
                        f"hashable values (int, float, str, tuple), got {type(config[bad]).__name__}") from None
    return (metric.stats,), aux


def _hashable(value) -> bool:
    try:
        hash(value)
        return True
    except TypeError:
        return False


def _unflatten(cls, aux, children):
    metric = object.__new__(cls)
    metric.__dict__.update(dict(aux))
    metric.stats = children[0]
    return metric


class Metric:
    """A metric computed from statistics summed over every real example of a split.

    A subclass computes, in ``__init__``, one row of statistics per example and passes them to
    ``super().__init__(**stats)`` (each a ``(B, ...)`` array); every other attribute it sets is
    a setting (hashable: int, float, str, tuple). :meth:`compute` turns the sums into the value.
    The instance is a pytree (its statistics are the leaves), so it travels through ``jit``,
    ``lax.scan`` and ``pmap`` as the loss's other outputs do.

    Example (the mean absolute error, written as a metric)::

        class MeanAbsoluteError(jaxlight.metrics.Metric):
            def __init__(self, pred, target):
                super().__init__(error=jnp.abs(pred - target), count=jnp.ones_like(target))

            def compute(self, totals):
                return totals["error"] / max(totals["count"], 1)

    Integer statistics are summed exactly (int32 on the device, int64 over the steps on the
    host); floating ones in float32 on the device and float64 over the steps.
    """

    def __init__(self, **stats):
        self.stats = stats

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        jax.tree_util.register_pytree_node(cls, _flatten, lambda aux, children: _unflatten(cls, aux, children))

    def reduce(self, mask) -> "Metric":
        """The sums over this batch's real rows (``mask`` ``(B,)``, 1.0 real, 0.0 padding): a
        metric of the same class whose statistics are those sums. Override it to sum into
        another form (a confusion matrix scatters ``(label, pred)`` pairs into ``(C, C)``)."""
        real = jnp.asarray(mask) > 0

        def masked_sum(s):
            keep = real.reshape(real.shape + (1,) * (jnp.ndim(s) - 1))
            return jnp.sum(jnp.where(keep, s, jnp.zeros((), jnp.asarray(s).dtype)), axis=0)

        return self.with_stats(jax.tree.map(masked_sum, self.stats))

    def compute(self, totals: dict):
        """The value from the statistics summed over the whole split (numpy arrays): a float,
        or an array (a confusion matrix)."""
        raise NotImplementedError(f"{type(self).__name__} must define compute(self, totals)")

    def with_stats(self, stats: dict) -> "Metric":
        """The same metric (class and settings) holding ``stats``."""
        metric = object.__new__(type(self))
        metric.__dict__.update({k: v for k, v in vars(self).items() if k != "stats"})
        metric.stats = stats
        return metric

    def check(self, batch_size: int, name: str) -> str | None:
        """What is wrong with the per-example statistics for a batch of ``batch_size`` rows."""
        if not isinstance(self.stats, dict) or not self.stats:
            return f"metric {name!r} ({type(self).__name__}) holds no statistics: call super().__init__(**stats)"
        for key, value in self.stats.items():
            shape = tuple(getattr(value, "shape", ()))
            if not shape or shape[0] != batch_size:
                return (f"metric {name!r} ({type(self).__name__}) statistic {key!r} has shape {shape}; expected "
                        f"({batch_size}, ...): one row per example")
        return None

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k != "stats")
        return f"{type(self).__name__}({settings})"


jax.tree_util.register_pytree_node(Metric, _flatten, lambda aux, children: _unflatten(Metric, aux, children))


def sum_steps(metric: Metric) -> dict:
    """A metric's per-step sums (each statistic ``(steps, ...)``) summed over the steps, in
    int64 or float64."""
    def total(a):
        a = np.asarray(a)
        return a.sum(axis=0, dtype=np.int64 if np.issubdtype(a.dtype, np.integer) else np.float64)
    return {k: total(v) for k, v in metric.stats.items()}


def finish(metric: Metric):
    """The value of a metric whose statistics are per-step sums ``(steps, ...)``: a Python
    float for a scalar, else a numpy array."""
    value = metric.compute(sum_steps(metric))
    value = np.asarray(value)
    return float(value) if value.ndim == 0 else value


class SavedStats:
    """A metric's per-step sums as a checkpoint kept them (``meta.json`` holds numbers, not
    classes): the resumed run's own metric of the same name gives them their class back
    (:func:`revive`)."""

    def __init__(self, stats: dict):
        self.stats = stats


def to_json(value) -> dict:
    """A metric's (or :class:`SavedStats`') statistics as JSON data."""
    return {"__metric__": {k: {"dtype": np.asarray(v).dtype.str, "data": np.asarray(v).tolist()}
                           for k, v in value.stats.items()}}


def from_json(data) -> SavedStats | None:
    """The :class:`SavedStats` that :func:`to_json` wrote; None for anything else."""
    if not (isinstance(data, dict) and set(data) == {"__metric__"} and isinstance(data["__metric__"], dict)):
        return None
    return SavedStats({k: np.asarray(v["data"], np.dtype(v["dtype"])) for k, v in data["__metric__"].items()})


def revive(steps: list[dict]) -> list[dict]:
    """Per-chunk metric dicts with every :class:`SavedStats` turned back into the metric of
    the same name found in a later chunk (left as it is when there is none yet)."""
    live = {k: v for m in steps for k, v in m.items() if isinstance(v, Metric)}
    return [{k: live[k].with_stats(v.stats) if isinstance(v, SavedStats) and k in live else v
             for k, v in m.items()} for m in steps]


# --------------------------------------------------------------------------------------------
# Classification: per-class counts from (prediction, label) pairs


def _classes(pred, label, num_classes, who: str):
    """Class indices from ``pred`` (``(B,)`` ints, or ``(B, C)`` scores: their argmax) and ``label``."""
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise ValueError(f"{who}: num_classes must be an int >= 2, got {num_classes!r}")
    pred, label = jnp.asarray(pred), jnp.asarray(label)
    if pred.ndim == 2:
        if pred.shape[1] != num_classes:
            raise ValueError(f"{who}: pred has {pred.shape[1]} scores per example, num_classes is {num_classes}")
        pred = jnp.argmax(pred, axis=-1)
    if pred.ndim != 1 or not jnp.issubdtype(pred.dtype, jnp.integer):
        raise ValueError(f"{who}: pred must be (B,) class indices or (B, {num_classes}) scores, got "
                         f"{pred.shape} {pred.dtype} (for one score per example, threshold it: "
                         f"(logit > 0).astype(jnp.int32))")
    if label.ndim != 1 or not jnp.issubdtype(label.dtype, jnp.integer) or label.shape != pred.shape:
        raise ValueError(f"{who}: label must be (B,) class indices like pred {pred.shape}, got {label.shape} "
                         f"{label.dtype}")
    return pred.astype(jnp.int32), label.astype(jnp.int32)


def _counts(pred, label, mask, num_classes: int) -> dict:
    """Per-class ``tp``, ``support`` (true rows) and ``predicted`` over the real rows."""
    real = (jnp.asarray(mask) > 0).astype(jnp.int32)
    zeros = jnp.zeros((num_classes,), jnp.int32)
    return {"tp": zeros.at[label].add(real * (pred == label).astype(jnp.int32)),
            "support": zeros.at[label].add(real),
            "predicted": zeros.at[pred].add(real)}


def _ratio(num, den):
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


class _Classification(Metric):
    """Per-class precision, recall or F1 averaged as scikit-learn's ``average=`` does, with
    ``zero_division=0`` (a class never predicted has precision 0). ``macro`` averages over the
    classes that occur in the labels or the predictions, ``weighted`` weights each by its
    support, ``micro`` pools the counts, ``binary`` is class ``pos_label``'s value."""

    name = "metric"

    def __init__(self, pred, label, num_classes: int, average: str = "macro", pos_label: int = 1):
        if average not in AVERAGES:
            raise ValueError(f"{type(self).__name__}: average must be one of {AVERAGES}, got {average!r}")
        if average == "binary" and not 0 <= pos_label < num_classes:
            raise ValueError(f"{type(self).__name__}: pos_label {pos_label} is not a class of {num_classes}")
        pred, label = _classes(pred, label, num_classes, type(self).__name__)
        self.num_classes, self.average, self.pos_label = num_classes, average, pos_label
        super().__init__(pred=pred, label=label)

    def reduce(self, mask):
        return self.with_stats(_counts(self.stats["pred"], self.stats["label"], mask, self.num_classes))

    def per_class(self, tp, support, predicted):
        raise NotImplementedError

    def compute(self, totals):
        tp, support, predicted = (np.asarray(totals[k], np.int64) for k in ("tp", "support", "predicted"))
        if self.average == "micro":
            return float(self.per_class(tp.sum(), support.sum(), predicted.sum()))
        values = self.per_class(tp, support, predicted)
        if self.average == "binary":
            return float(values[self.pos_label])
        if self.average == "weighted":
            return float((values * support).sum() / support.sum()) if support.sum() else 0.0
        present = (support + predicted) > 0
        return float(values[present].mean()) if present.any() else 0.0


class F1(_Classification):
    """F1 score over the split: ``2 tp / (2 tp + fp + fn)`` per class, then averaged.

    Args:
        pred: ``(B,)`` predicted class indices, or ``(B, C)`` scores (their argmax is taken).
        label: ``(B,)`` true class indices.
        num_classes: C.
        average: "macro" (default: the mean over the classes present), "micro", "weighted"
            or "binary" (class ``pos_label``), as ``sklearn.metrics.f1_score``.
        pos_label: the positive class for ``average="binary"``.
    """

    def per_class(self, tp, support, predicted):
        return _ratio(2 * tp, support + predicted)


class Precision(_Classification):
    """Precision ``tp / (tp + fp)`` over the split; arguments as :class:`F1`."""

    def per_class(self, tp, support, predicted):
        return _ratio(tp, predicted)


class Recall(_Classification):
    """Recall ``tp / (tp + fn)`` over the split; arguments as :class:`F1`."""

    def per_class(self, tp, support, predicted):
        return _ratio(tp, support)


class ConfusionMatrix(Metric):
    """The ``(C, C)`` confusion matrix of the split: row = true class, column = predicted
    (``sklearn.metrics.confusion_matrix``), int64 counts of the real examples.

    Args:
        pred: ``(B,)`` predicted class indices, or ``(B, C)`` scores.
        label: ``(B,)`` true class indices.
        num_classes: C.
    """

    def __init__(self, pred, label, num_classes: int):
        pred, label = _classes(pred, label, num_classes, "ConfusionMatrix")
        self.num_classes = num_classes
        super().__init__(pred=pred, label=label)

    def reduce(self, mask):
        real = (jnp.asarray(mask) > 0).astype(jnp.int32)
        c = self.num_classes
        matrix = jnp.zeros((c, c), jnp.int32).at[self.stats["label"], self.stats["pred"]].add(real)
        return self.with_stats({"matrix": matrix})

    def compute(self, totals):
        return np.asarray(totals["matrix"], np.int64)
