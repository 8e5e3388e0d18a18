"""Metric loggers for the Trainer: CSV and TensorBoard."""

from jaxlight.loggers.base import Logger
from jaxlight.loggers.csv_logger import CSVLogger
from jaxlight.loggers.tensorboard import TensorBoardLogger

LOGGERS = {"csv": CSVLogger, "tensorboard": TensorBoardLogger}

__all__ = ["CSVLogger", "LOGGERS", "Logger", "TensorBoardLogger"]
