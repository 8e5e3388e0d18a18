"""Time to a target test accuracy, compilation included, evaluation excluded."""

from __future__ import annotations

import time

from benchmarks.variants import Context, make

__all__ = ["time_to_accuracy"]


def time_to_accuracy(name: str, ctx: Context, target: float, max_epochs: float, evals_per_epoch: int = 4,
                     max_seconds: float | None = None) -> dict:
    """Train a fresh variant until its test accuracy reaches ``target``.

    The clock runs from before the variant is built (so JIT / ``torch.compile`` compilation
    counts) and pauses while the test set is evaluated, ``evals_per_epoch`` times per epoch.

    Returns:
        ``{"variant", "target", "reached", "seconds", "steps", "curve": [[seconds, steps,
        accuracy], ...]}``; ``seconds`` is None when the target was not reached within
        ``max_epochs`` epochs (or ``max_seconds`` of training).
    """
    t0 = time.perf_counter()
    variant = make(name, ctx)
    nb = ctx.num_batches
    chunk = max(1, nb // evals_per_epoch)
    if hasattr(variant, "fit_to_accuracy"):  # a library that owns its loop (jaxlight, Lightning)
        return {"variant": name, "model": ctx.model, "batch_size": ctx.batch_size, "target": target,
                **variant.fit_to_accuracy(target, max_epochs, chunk, max_seconds, t0)}
    elapsed = build_s = time.perf_counter() - t0
    steps, curve, reached, chunk_seconds = 0, [], None, []
    while steps < max_epochs * nb:
        # Chunks end on epoch boundaries so that each epoch is exactly nb steps.
        k = min(chunk, nb - steps % nb)
        chunk_seconds.append(variant.run(k))
        elapsed += chunk_seconds[-1]
        steps += k
        acc = variant.accuracy()
        curve.append([elapsed, steps, acc])
        if acc >= target:
            reached = elapsed
            break
        if max_seconds is not None and elapsed > max_seconds:
            break
    # Compilation estimate: what the first chunk took beyond a typical later chunk (plus the
    # build). The training time without it is what a warm compilation cache would give.
    typical = sorted(chunk_seconds[1:])[len(chunk_seconds[1:]) // 2] if len(chunk_seconds) > 1 else 0.0
    compile_s = build_s + max(0.0, chunk_seconds[0] - typical)
    return {"variant": name, "model": ctx.model, "batch_size": ctx.batch_size, "target": target,
            "reached": reached is not None, "seconds": reached, "compile_s": compile_s,
            "train_s": None if reached is None else reached - compile_s, "steps": steps, "epochs": steps / nb,
            "chunk_seconds": chunk_seconds, "curve": curve}
