"""A user's own optimizer function: it builds its warmup + cosine schedule itself."""

import optax


def warmup_cosine_adamw(peak: float = 3e-3, warmup_steps: int = 3, total_steps: int = 12,
                        weight_decay: float = 1e-4) -> optax.GradientTransformation:
    """AdamW whose rate rises linearly from 0 to ``peak`` over ``warmup_steps`` updates, then
    falls along half a cosine to 1e-5 at ``total_steps``.

    Args:
        peak: the highest learning rate.
        warmup_steps: updates of the linear warmup.
        total_steps: the update at which the cosine ends.
        weight_decay: AdamW's decoupled decay.
    """
    schedule = optax.warmup_cosine_decay_schedule(0.0, peak, warmup_steps, total_steps, 1e-5)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=weight_decay))
