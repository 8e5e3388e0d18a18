"""Trainer callbacks: five hooks (see ``base.Callback``) and the stock callbacks."""

from jaxlight.callbacks.base import Callback
from jaxlight.callbacks.early_stopping import EarlyStopping
from jaxlight.callbacks.lr_monitor import LearningRateMonitor, current_lr
from jaxlight.callbacks.model_checkpoint import ModelCheckpoint
from jaxlight.callbacks.progress import ProgressBar

__all__ = ["Callback", "EarlyStopping", "LearningRateMonitor", "ModelCheckpoint", "ProgressBar", "current_lr"]
