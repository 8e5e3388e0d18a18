"""Convergence parity on full MNIST: trained independently, the two frameworks reach the same
accuracy.

Each framework draws its own initial weights and shuffles with its own generator, per seed
(``jaxlight.bridge.compare``). The mean test accuracies must agree within
``max(3 * sqrt(std_jax^2/K + std_torch^2/K), 0.3 points)`` (``compare.agreement_tolerance``),
and both must meet the accuracy floor for the settings used. Settings are cut to fit the test
budget on 2 CPU cores; ``the README`` has the longer runs.
"""

import numpy as np
import pytest

from jaxlight.bridge.compare import agreement_tolerance, compare, render_table
from jaxlight.recipes import recipe_for

# model, recipe overrides, seeds, accuracy floor (both frameworks, every seed's mean)
CASES = [
    ("softmax", {}, 3, 0.91),  # the recipe: 2 epochs
    ("mlp", {"lr": 1e-3, "epochs": 2}, 3, 0.965),
    # The recipe: 1 epoch. Measured with seeds 0 and 1: jaxlight 98.18 ± 0.21 %, torch
    # 98.04 ± 0.17 %: both frameworks sit below 98.5 % after one epoch, so the floor here is
    # 97.5 % (a question of the recipe, not of parity).
    ("cnn", {}, 2, 0.975),
]


@pytest.mark.slow
@pytest.mark.parametrize("model, overrides, seeds, floor", CASES, ids=[c[0] for c in CASES])
def test_independent_runs_reach_the_same_accuracy(model, overrides, seeds, floor, data_dir):
    payload = compare(recipe_for(model, **overrides), list(range(seeds)), data_dir, log=lambda _: None, torch_threads=1)
    print(render_table(payload))
    jax_, torch_ = payload["frameworks"]["jaxlight"], payload["frameworks"]["torch"]
    assert abs(payload["difference"]) <= payload["tolerance"], render_table(payload)
    assert jax_["mean"] >= floor and torch_["mean"] >= floor, render_table(payload)
    # Every run's accuracy curve and losses are real numbers, one loss per step.
    assert all(np.isfinite(v).all() for v in jax_["step_losses"] + torch_["step_losses"])


@pytest.mark.parametrize("a, b, expected", [
    ([0.97, 0.97, 0.97], [0.97, 0.97, 0.97], 0.003),            # no spread: the floor
    ([0.90, 0.96, 0.93], [0.93, 0.93, 0.93], 3 * 0.03 / np.sqrt(3)),  # spread decides
])
def test_agreement_tolerance(a, b, expected):
    assert agreement_tolerance(a, b) == pytest.approx(expected)
