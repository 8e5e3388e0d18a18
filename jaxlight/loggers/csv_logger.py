"""Metrics as one CSV table: a row per logged step, a column per metric."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from jaxlight.loggers.base import Logger
from jaxlight import report


__all__ = ["CSVLogger"]


class CSVLogger(Logger):
    """Write ``<save_dir>/metrics.csv`` (columns ``step`` then metric names, blank where a row
    lacks one, as Lightning's CSVLogger) and ``hparams.yaml``.

    One row per step: what is logged at a step (its loss, the ``lr`` its update applied, a
    validation run there, the epoch's means at an epoch's last step) lands on that step's row,
    a later value of a metric replacing an earlier one. Rows are buffered and written at each
    ``flush`` (epoch ends, fit end): appended while the columns stay the same and no written
    row changed, the file rewritten (atomically) otherwise.
    """

    def __init__(self, save_dir: str | os.PathLike):
        self.save_dir = Path(save_dir)
        self.path = self.save_dir / "metrics.csv"
        self.columns: list[str] = ["step"]
        self.rows: list[dict] = []      # every row, for rewrites
        self._row_of: dict[int, int] = {}  # step -> its row
        self._written = 0               # rows already in the file
        self._file_columns: list[str] = []

    def log_metrics(self, metrics, step):
        row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        for key in row:
            if key not in self.columns:
                self.columns.append(key)
        at = self._row_of.get(row["step"])
        if at is None:
            self._row_of[row["step"]] = len(self.rows)
            self.rows.append(row)
            return
        self.rows[at].update(row)
        if at < self._written:  # (a row already in the file changed: the next flush rewrites it)
            self._file_columns = []

    def log_hyperparams(self, params):
        """``<save_dir>/hparams.yaml`` (Lightning's file): the run's config as it was resolved."""
        import yaml

        self.save_dir.mkdir(parents=True, exist_ok=True)
        plain = json.loads(json.dumps(params, default=str))
        report.write_text_atomic(self.save_dir / "hparams.yaml", yaml.safe_dump(plain, sort_keys=False))

    def resume(self, step):
        """Keep the rows of an earlier run up to ``step``; later ones are about to be redone."""
        if not self.path.is_file():
            return
        with open(self.path, newline="") as f:
            reader = csv.DictReader(f)
            old = [{k: float(v) if k != "step" else int(v) for k, v in r.items() if v != ""} for r in reader]
            columns = list(reader.fieldnames or ["step"])
        self.rows = [r for r in old if r["step"] <= step] + self.rows
        self._row_of = {r["step"]: i for i, r in enumerate(self.rows)}
        self.columns = columns + [c for c in self.columns if c not in columns]
        self._written, self._file_columns = 0, []

    def flush(self):
        if len(self.rows) == self._written and self._file_columns == self.columns:
            return
        self.save_dir.mkdir(parents=True, exist_ok=True)
        if self._file_columns != self.columns or self._written == 0:
            tmp = self.path.with_suffix(".csv.tmp")
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, self.columns)
                writer.writeheader()
                writer.writerows(self.rows)
            os.replace(tmp, self.path)
            self._file_columns = list(self.columns)
        else:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, self.columns).writerows(self.rows[self._written:])
        self._written = len(self.rows)
