"""Each built-in model's default training recipe, shared by ``jaxlight`` and ``torch_ref``.

A recipe is read from the model's config file, which lies beside the model
(``jaxlight/models/<name>.yaml``, what ``jaxlight fit --config <name>`` runs): the file is the one
place its numbers are written. Adding ``jaxlight/models/<name>.yaml`` adds the recipe.

| model | task | data | optimizer | lr | batch | epochs |
| --- | --- | --- | --- | --- | --- | --- |
| linear | regression (MSE) | synthetic ``y = xW + b + noise`` | sgd | 0.05 | 64 | 10 |
| logistic | binary (is it a zero) | MNIST | adam | 0.001 | 64 | 2 |
| softmax | multiclass | MNIST | adam | 0.001 | 64 | 2 |
| mlp | multiclass | MNIST | adam | 0.01 | 64 | 10 (the tutorial's) |
| cnn | multiclass | MNIST | adam | 0.001 | 32 | 1 |
| lstm | multiclass | MNIST | adam | 0.002 | 64 | 2 |

Pure Python (PyYAML, no JAX): ``torch_ref`` and the command lines read the same table.

    >>> from jaxlight.recipes import recipe_for
    >>> recipe_for("mlp", epochs=1)
    Recipe(model='mlp', task='multiclass', dataset='mnist', optimizer='adam', lr=0.01, batch_size=64, epochs=1, momentum=0.0, weight_decay=None, seed=0)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

__all__ = ["Recipe", "RECIPES", "MODEL_DIR", "recipe_for", "recipe_from_config"]

MODEL_DIR = Path(__file__).parent / "models"


@dataclass(frozen=True)
class Recipe:
    model: str
    task: str
    dataset: str
    optimizer: str = "adam"
    lr: float = 1e-3
    batch_size: int = 64
    epochs: int = 2
    momentum: float = 0.0
    weight_decay: float | None = None  # None: the optimizer's own default (AdamW: 0.01)
    seed: int = 0

    def optimizer_kwargs(self) -> dict:
        kwargs = {"momentum": self.momentum} if self.optimizer == "sgd" else {}  # (Adam has no momentum)
        if self.weight_decay is not None:
            kwargs["weight_decay"] = self.weight_decay
        return kwargs


def recipe_from_config(model: str, config: Mapping) -> Recipe:
    """The recipe a built-in config file (a parsed ``jaxlight/models/<model>.yaml``) runs: its loss,
    dataset, optimizer (``jaxlight.optim.<name>`` and its ``lr``, ``momentum``, ``weight_decay``),
    the trainer's ``max_epochs`` and ``batch_size``, and its seed."""
    try:
        opt = config["optimizer"]
        kwargs = opt.get("init_args") or {}
        trainer = config["trainer"]
        return Recipe(model, task=config["loss"], dataset=config["data"]["init_args"]["dataset"],
                      optimizer=opt["class_path"].rsplit(".", 1)[-1], lr=kwargs["lr"],
                      batch_size=trainer["batch_size"], epochs=trainer["max_epochs"],
                      momentum=kwargs.get("momentum", 0.0), weight_decay=kwargs.get("weight_decay"),
                      seed=config.get("seed", 0))
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{MODEL_DIR / (model + '.yaml')}: not a built-in recipe (missing or malformed "
                         f"key {exc})") from None


def _read_recipes() -> dict[str, Recipe]:
    import yaml

    return {p.stem: recipe_from_config(p.stem, yaml.safe_load(p.read_text()))
            for p in sorted(MODEL_DIR.glob("*.yaml"))}


RECIPES: dict[str, Recipe] = _read_recipes()


def recipe_for(model: str, **overrides) -> Recipe:
    """The model's default recipe with every override that is not None applied."""
    if model not in RECIPES:
        raise ValueError(f"unknown model {model!r}; choose one of {sorted(RECIPES)}")
    return dataclasses.replace(RECIPES[model], **{k: v for k, v in overrides.items() if v is not None})
