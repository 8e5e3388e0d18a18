"""The errors a user meets before any compiled step runs; at the bottom of the import order so
that every layer (tasks, data, state, step) can raise them."""

__all__ = ["BatchError", "DonatedStateError", "exception_chain"]


class BatchError(ValueError):
    """A batch that does not fit the model or the loss; raised before XLA runs a step."""


class DonatedStateError(RuntimeError):
    """A TrainState that was donated to a compiled step was used again."""


def exception_chain(exc: BaseException | None):
    """``exc``, then the exception it was raised from or during (``__cause__``, else
    ``__context__``), and so on down the chain; each once."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__
