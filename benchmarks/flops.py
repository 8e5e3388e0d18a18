"""FLOPs of one training step, as XLA counts them for the compiled ``jaxlight`` step.

The same math runs in every variant (same model, loss and Adam update), so one count per model
and batch size serves all of them. XLA's count includes the elementwise work and the optimizer
update, not only the matmuls and convolutions; ``analytic_flops`` counts those alone (6 FLOPs
per multiply-accumulate per example: forward, input gradient, weight gradient), a cross-check.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlight import build_model, create_train_state, make_optimizer, tasks
from jaxlight.step import _train_step

__all__ = ["step_flops", "analytic_flops"]


def step_flops(model: str, batch_size: int) -> float:
    """XLA's FLOP count of one ``train_step`` (forward, backward, Adam) at ``batch_size``."""
    state = create_train_state(build_model(model), make_optimizer("adam", 1e-3), tasks.multiclass())
    batch = {"x": jnp.zeros((batch_size, 28, 28), jnp.uint8), "y": jnp.zeros((batch_size,), jnp.int32),
             "mask": jnp.ones((batch_size,), jnp.float32)}
    cost = jax.jit(_train_step).lower(state, batch).compile().cost_analysis()
    if isinstance(cost, list):  # older jax returned one dict per program
        cost = cost[0]
    return float(cost.get("flops", 0.0))


def analytic_flops(model: str, batch_size: int) -> float:
    """Multiply-adds of the matmuls/convolutions, times 2 (FLOPs) times 3 (forward + two
    backward products). The backward of the first layer's input gradient is counted although
    it is not needed, as is usual; a cross-check of ``step_flops``."""
    macs = {
        "mlp": 784 * 256 + 256 * 10,
        # conv1 28x28x(9*1)x32, conv2 14x14x(9*32)x64, fc1 3136x256, fc2 256x10
        "cnn": 28 * 28 * 9 * 32 + 14 * 14 * 9 * 32 * 64 + 3136 * 256 + 256 * 10,
        # 28 steps of (28 + 128) x 512, then 128 x 10
        "lstm": 28 * (28 + 128) * 512 + 128 * 10,
    }[model]
    return 6.0 * macs * batch_size
