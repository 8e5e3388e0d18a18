"""A small classifier with Dropout and BatchNorm, its loss, and models for the error cases."""

import jax.numpy as jnp
import optax
from flax import nnx

import jaxlight


class Net(nnx.Module):
    """Features -> Linear (backbone) -> BatchNorm -> ReLU -> Dropout -> Linear (head).

    Args:
        width: hidden units of the backbone.
        in_features: input features.
        dropout: the dropout rate after the backbone.
        num_classes: output logits.
    """

    def __init__(self, width: int, in_features: int = 8, dropout: float = 0.2, num_classes: int = 3, *,
                 rngs: nnx.Rngs):
        jaxlight.save_hyperparameters(self)
        self.backbone = nnx.Linear(in_features, width, rngs=rngs)
        self.bn = nnx.BatchNorm(width, rngs=rngs)
        self.drop = nnx.Dropout(dropout, rngs=rngs)
        self.head = nnx.Linear(width, num_classes, rngs=rngs)

    def __call__(self, x):
        return self.head(self.drop(nnx.relu(self.bn(self.backbone(x)))))


class Unrecorded(nnx.Module):
    """The same layers, without save_hyperparameters: its checkpoints record no model."""

    def __init__(self, width: int = 16, *, rngs: nnx.Rngs):
        self.backbone = nnx.Linear(8, width, rngs=rngs)
        self.head = nnx.Linear(width, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.backbone(x)))


class Mixed(nnx.Module):
    """One of every layer ``init: torch`` knows: Embed, Conv, LSTMCell, Linear."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(50, 40, rngs=rngs)
        self.conv = nnx.Conv(6, 30, (3, 3), rngs=rngs)
        self.cell = nnx.LSTMCell(24, 32, rngs=rngs)
        self.out = nnx.Linear(64, 20, rngs=rngs)

    def __call__(self, x):
        return self.out(x)


class NotAModule:
    """A plain class: not an nnx.Module."""

    def __init__(self, width: int = 3):
        self.width = width


def loss_fn(model, batch):
    """Per-example cross-entropy and accuracy."""
    logits = model(batch["features"])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    return losses, {"accuracy": (logits.argmax(-1) == batch["label"]).astype(jnp.float32)}


def loss_with_f1(model, batch):
    """The cross-entropy, macro-F1 and the confusion matrix of the whole split."""
    logits = model(batch["features"])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    pred = logits.argmax(-1)
    return losses, {"f1": jaxlight.metrics.F1(pred, batch["label"], num_classes=3),
                    "cm": jaxlight.metrics.ConfusionMatrix(pred, batch["label"], num_classes=3)}


def not_an_optimizer(learning_rate: float = 0.1):
    """Returns a dict, not an optax transformation."""
    return {"learning_rate": learning_rate}
