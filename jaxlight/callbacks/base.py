"""The callback protocol: five hooks, called at chunk boundaries, each with the trainer.

The Trainer calls, in order: ``on_fit_start`` once; then per compiled chunk of K steps
``on_train_chunk_end``; ``on_validation_end`` after every validation run; ``on_epoch_end``
after each full epoch (after that epoch's validation); ``on_fit_end`` once, also when training
stopped early. Hooks see the state *between* compiled calls, never inside one, so K (the
trainer's ``steps_per_execution``) sets how often they run; with K = 1 it is every step.

A callback stops training by setting ``trainer.should_stop = True``. Whatever it must
remember across a restart goes in ``state_dict()`` (plain JSON data); the trainer saves it in
every checkpoint and hands it back to ``load_state_dict`` on resume.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from jaxlight.state import TrainState
    from jaxlight.trainer import Trainer

__all__ = ["Callback"]


class Callback:
    """Base class: every hook does nothing; override the ones you need."""

    # Set by the Trainer when it holds several callbacks of this class (``[<identity()>]``).
    _key_suffix = ""

    @property
    def state_key(self) -> str:
        """The name this callback's state is saved under (unique per trainer): the class name,
        and when a trainer holds several of the class, ``[<identity()>]`` after it."""
        return type(self).__name__ + self._key_suffix

    def identity(self) -> str | None:
        """What tells this callback apart from another of its class in one Trainer (a
        ``ModelCheckpoint``'s folder, an ``EarlyStopping``'s metric); None: nothing does, and
        two of them are refused unless ``state_key`` is overridden."""
        return None

    def find_state(self, states: dict) -> dict | None:
        """This callback's saved state among a checkpoint's (``{state_key: state_dict()}``)."""
        return states.get(self.state_key)

    def step_interval(self) -> int | None:
        """A step count the trainer must end a compiled chunk on (checkpoint every N steps)."""
        return None

    def on_fit_start(self, trainer: Trainer, state: TrainState) -> None:
        pass

    def on_train_chunk_end(self, trainer: Trainer, state: TrainState, metrics: dict) -> None:
        """After each compiled call; ``metrics`` holds per-step host arrays, each ``(K,)``."""

    def on_validation_end(self, trainer: Trainer, state: TrainState, metrics: dict) -> None:
        """After a validation run; ``metrics`` like ``{"val_loss": 0.3, "val_accuracy": 0.9}``."""

    def on_epoch_end(self, trainer: Trainer, state: TrainState, metrics: dict) -> None:
        """After a full epoch; ``metrics`` holds the epoch's train means and its validation."""

    def on_fit_end(self, trainer: Trainer, state: TrainState) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
