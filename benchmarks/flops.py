"""FLOPs of one training step, as XLA counts them for the compiled ``jaxlight`` step.

The same math runs in every variant (same model, loss and Adam update), so one count per model
and batch size serves all of them. XLA's count includes the elementwise work and the optimizer
update, not only the matmuls and convolutions, but it counts a ``lax.scan`` body once: for the
LSTM it misses 27 of 28 steps. ``analytic_flops`` (matmuls and convolutions only) is therefore
the count the fraction of peak uses; XLA's is kept beside it as a cross-check.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlight import build_model, create_train_state, make_optimizer, tasks
from jaxlight.step import apply_train_step

__all__ = ["step_flops", "analytic_flops"]


def step_flops(model: str, batch_size: int) -> float:
    """XLA's FLOP count of one ``train_step`` (forward, backward, Adam) at ``batch_size``."""
    state = create_train_state(build_model(model), make_optimizer("adam", 1e-3), tasks.multiclass())
    batch = {"x": jnp.zeros((batch_size, 28, 28), jnp.uint8), "y": jnp.zeros((batch_size,), jnp.int32)}
    mask = jnp.ones((batch_size,), jnp.float32)
    cost = jax.jit(apply_train_step).lower(state, batch, mask).compile().cost_analysis()
    if isinstance(cost, list):  # older jax returned one dict per program
        cost = cost[0]
    return float(cost.get("flops", 0.0))


def analytic_flops(model: str, batch_size: int) -> float:
    """FLOPs of the matmuls and convolutions of one training step: 2 per multiply-accumulate,
    times 3 (forward, input gradient, weight gradient) except for the first layer, whose input
    gradient is not needed (times 2). This is the count ``fraction_of_peak`` uses: XLA's
    ``cost_analysis`` counts a ``lax.scan`` body once, not once per iteration (the LSTM's 28
    steps), so it undercounts recurrent models."""
    first, rest = {
        "mlp": (784 * 256, 256 * 10),
        # conv1 28x28 outputs x (3*3*1) x 32; conv2 14x14 x (3*3*32) x 64; fc1 3136x256; fc2 256x10
        "cnn": (28 * 28 * 9 * 32, 14 * 14 * 9 * 32 * 64 + 3136 * 256 + 256 * 10),
        # the input projection of 28 rows of 28 pixels; 28 recurrent steps 128 -> 512; fc 128x10
        "lstm": (28 * 28 * 512, 28 * 128 * 512 + 128 * 10),
    }[model]
    return (4.0 * first + 6.0 * rest) * batch_size
