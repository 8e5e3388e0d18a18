"""The errors a user meets before any compiled step runs; at the bottom of the import order so
that every layer (tasks, data, state, step) can raise them."""

__all__ = ["BatchError", "DonatedStateError"]


class BatchError(ValueError):
    """A batch that does not fit the model or the loss; raised before XLA runs a step."""


class DonatedStateError(RuntimeError):
    """A TrainState that was donated to a compiled step was used again."""
