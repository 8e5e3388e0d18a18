"""Step-level parity between a PyTorch model and its jaxlight port, level by level.

Given a torch model and the jaxlight model meant to compute the same thing, :func:`check_parity`
gives both the same initial weights (the torch model's, converted by ``jaxlight.interop``) and
the same batches in the same order (``jaxlight.data.epoch_order``: the torch side takes exactly
the examples the jaxlight side does, without the padding of the last batch), then compares

1. ``forward``: the outputs on the first batch;
2. ``loss`` and ``grad``: the loss and every parameter's gradient on that batch;
3. ``step``: every parameter after one optimizer step (``jaxlight.optim`` against
   ``torch_ref.optim`` with the same arguments: SGD, SGD with momentum, Adam, AdamW);
4. ``trajectory``: every parameter and the loss after each of ``steps`` steps.

and reports the first step and the first parameter where the two differ beyond tolerance, with
the size of the difference (:class:`ParityReport`). jaxlight's own compiled ``train_step`` takes
the JAX steps, so what is checked is what trains.

An element ``a`` (jaxlight) against ``b`` (torch) is within tolerance when
``|a - b| <= atol + rtol * |b|`` (``numpy.allclose``'s rule). The defaults
(:data:`DEFAULT_TOLERANCES`) hold for the six models in float32 on CPU; see ``the README``
for the measured worst cases. Why ``step``/``trajectory`` need more room than ``grad``: Adam
divides by ``sqrt(v) + eps``, so a gradient that is ~0 by cancellation (its float32 rounding
differs between libraries) can move by up to ``lr`` in either direction on the first step.

This module needs torch (the ``torch`` extra) and imports it only when called.

Example:
    >>> import torch_ref, jaxlight
    >>> from jaxlight.data import load_task_data
    >>> train, _, _ = load_task_data("mnist", data_dir)                       # doctest: +SKIP
    >>> report = check_parity(torch_ref.build_model("mlp"), jaxlight.build_model("mlp"), "mlp",
    ...                       task="multiclass", optimizer="adam", lr=1e-3,
    ...                       data=train.take(2000), steps=100)              # doctest: +SKIP
    >>> print(report)                                                        # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from jaxlight.interop import Layout, layout_for, params_from_torch, params_to_torch

__all__ = ["Tolerance", "DEFAULT_TOLERANCES", "LEVELS", "Divergence", "ParityReport", "check_parity", "compare_arrays"]

LEVELS = ("forward", "loss", "grad", "step", "trajectory")


@dataclass(frozen=True)
class Tolerance:
    """``|jax - torch| <= atol + rtol * |torch|``, elementwise."""

    rtol: float
    atol: float

    def __str__(self) -> str:
        return f"atol {self.atol:g} + rtol {self.rtol:g}"


# float32 on CPU. forward/loss: one pass, rounding only. grad: backprop sums in a different
# order. step/trajectory: see the module docstring (Adam near-zero gradients), then compounding
# over the steps.
DEFAULT_TOLERANCES = {
    "forward": Tolerance(rtol=1e-5, atol=1e-5),
    "loss": Tolerance(rtol=1e-5, atol=1e-6),
    "grad": Tolerance(rtol=1e-3, atol=1e-5),
    "step": Tolerance(rtol=1e-3, atol=1e-4),
    "trajectory": Tolerance(rtol=1e-2, atol=2e-3),
}


@dataclass(frozen=True)
class Divergence:
    """Where jaxlight and torch first differ beyond tolerance.

    Attributes:
        level: one of ``LEVELS``.
        step: optimizer steps taken before the comparison (0 for forward/loss/grad).
        name: the PyTorch name (``"fc1.weight"``), ``"outputs"`` or ``"loss"``.
        max_abs_diff: ``max |jax - torch|`` over the tensor.
        index: the element where the tolerance is exceeded most.
        jax_value, torch_value: the two values there.
        tolerance: the tolerance that was exceeded.
    """

    level: str
    step: int
    name: str
    max_abs_diff: float
    index: tuple
    jax_value: float
    torch_value: float
    tolerance: Tolerance

    def __str__(self) -> str:
        return (f"{self.level} diverges at step {self.step}, parameter {self.name}: max |jax - torch| = "
                f"{self.max_abs_diff:.3g}; worst element {list(self.index)}: jax {self.jax_value:.9g}, "
                f"torch {self.torch_value:.9g} (tolerance {self.tolerance})")


@dataclass
class ParityReport:
    """The outcome of :func:`check_parity`.

    Attributes:
        divergence: the first divergence (levels in order, then steps, then parameters in
            ``state_dict`` order), or None when everything is within tolerance.
        worst: per level, ``(max_abs_diff, name, step)`` of the largest difference measured.
        steps_checked: trajectory steps compared (fewer than asked when it diverged).
        history: per optimizer step, ``{"step", "max_abs_diff", "max_rel_l2"}`` over all
            parameters (``rel_l2 = ||jax - torch|| / ||torch||`` per tensor): how the two
            paths drift apart.
    """

    model: str
    optimizer: str
    steps: int
    tolerances: dict
    divergence: Divergence | None = None
    worst: dict = field(default_factory=dict)
    steps_checked: int = 0
    history: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.divergence is None

    def __str__(self) -> str:
        lines = [f"parity {self.model} / {self.optimizer}, {self.steps_checked}/{self.steps} steps: "
                 + ("OK" if self.ok else "DIVERGED")]
        for level in LEVELS:
            if level in self.worst:
                d, name, step = self.worst[level]
                lines.append(f"  {level:<10} max |diff| {d:.3g} ({name}, step {step}); tolerance {self.tolerances[level]}")
        if self.divergence:
            lines.append(f"  first divergence: {self.divergence}")
        return "\n".join(lines)


def compare_arrays(jax_value, torch_value, tol: Tolerance):
    """``(exceeded, max_abs_diff, worst_index, jax_at, torch_at)`` for two same-shaped arrays."""
    a = np.asarray(jax_value, np.float64)
    b = np.asarray(torch_value, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: jax {a.shape}, torch {b.shape}")
    diff = np.abs(a - b)
    if diff.size == 0:
        return False, 0.0, (), 0.0, 0.0
    excess = diff - (tol.atol + tol.rtol * np.abs(b))
    worst = np.unravel_index(int(np.nanargmax(np.where(np.isnan(diff), np.inf, excess))), diff.shape)
    exceeded = bool(np.any(excess > 0) or np.any(np.isnan(diff) != np.isnan(b)))
    return exceeded, float(np.nanmax(diff)), tuple(int(i) for i in worst), float(a[worst]), float(b[worst])


class _Checker:
    def __init__(self, report: ParityReport):
        self.report = report

    def __call__(self, level: str, step: int, name: str, jax_value, torch_value) -> bool:
        """Record one comparison; True if it diverged (and it is the first divergence)."""
        tol = self.report.tolerances[level]
        exceeded, d, index, ja, to = compare_arrays(jax_value, torch_value, tol)
        if level not in self.report.worst or d > self.report.worst[level][0]:
            self.report.worst[level] = (d, name, step)
        if exceeded and self.report.divergence is None:
            self.report.divergence = Divergence(level, step, name, d, index, ja, to, tol)
        return exceeded


def check_parity(
    torch_model,
    jax_model,
    model: str | Layout,
    *,
    task: str,
    data,
    optimizer: str = "adam",
    lr: float = 1e-3,
    optimizer_kwargs: dict | None = None,
    batch_size: int = 64,
    steps: int = 100,
    seed: int = 0,
    tolerances: dict | None = None,
    torch_optimizer: Callable | None = None,
    stop_at_divergence: bool = True,
) -> ParityReport:
    """Run both frameworks side by side from the torch model's weights and compare them.

    Args:
        torch_model: a ``torch.nn.Module``; its current weights are the starting point (it is
            trained in place).
        jax_model: the jaxlight ``nnx.Module`` (its structure is used; its weights are replaced
            by the converted torch weights).
        model: the conversion layout: a model name of ``jaxlight.interop.LAYOUTS`` or a
            ``Layout`` for your own pair.
        task: ``"regression"``, ``"binary"`` or ``"multiclass"`` (``jaxlight.tasks``).
        data: an ``ArrayDataset`` on the host: ``x (N, ...)`` uint8 images (scaled ``/ 255`` on
            both sides) or float32 features, ``y (N,)`` labels or ``(N, D)`` targets.
        optimizer, lr, optimizer_kwargs: ``jaxlight.optim.make_optimizer`` and
            ``torch_ref.optim.make_optimizer`` are built from the same arguments
            (e.g. ``"sgd", momentum=0.9``).
        batch_size: examples per step; the last batch of an epoch is shorter (padded and masked
            on the jaxlight side), as ``DataLoader(drop_last=False)``.
        steps: trajectory length (level 4); may span several epochs.
        seed: the data-order seed (``epoch_order(seed, epoch, ...)``).
        tolerances: overrides of ``DEFAULT_TOLERANCES``, by level.
        torch_optimizer: ``params -> torch.optim.Optimizer`` to use instead of
            ``torch_ref.optim`` (to check your own).
        stop_at_divergence: stop the trajectory at the first step that diverges.

    Returns:
        A :class:`ParityReport`; ``report.ok`` is False and ``report.divergence`` says where
        when anything differs beyond tolerance.
    """
    import jax
    import torch

    import torch_ref.optim
    import torch_ref.tasks
    from flax import nnx

    from jaxlight.data.arrays import epoch_order, gather_batch, num_batches
    from jaxlight.optim import make_optimizer
    from jaxlight.state import create_train_state
    from jaxlight.step import _forward, _loss_fn, check_batch, train_step
    from jaxlight.tasks import TASKS
    from torch_ref.interop import grads_to_numpy, state_dict_to_numpy

    layout = layout_for(model)
    tols = {**DEFAULT_TOLERANCES, **(tolerances or {})}
    unknown = set(tols) - set(LEVELS)
    if unknown:
        raise ValueError(f"unknown tolerance level(s) {sorted(unknown)}; levels are {LEVELS}")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {sorted(TASKS)}")
    kwargs = dict(optimizer_kwargs or {})
    opt_label = optimizer + "".join(f" {k}={v}" for k, v in kwargs.items())
    report = ParityReport(layout.name, opt_label, steps, tols)
    check = _Checker(report)

    # Same initial weights: the torch model's, converted.
    graphdef, template, model_state = nnx.split(jax_model, nnx.Param, ...)
    params = params_from_torch(state_dict_to_numpy(torch_model), template, layout)
    jtask, ttask = TASKS[task](), torch_ref.tasks.TASKS[task]()
    tx = make_optimizer(optimizer, lr, **kwargs)
    state = create_train_state(nnx.merge(graphdef, params, model_state), tx, jtask, seed)
    topt = (torch_optimizer or (lambda p: torch_ref.optim.make_optimizer(optimizer, p, lr, **kwargs)))(
        torch_model.parameters())

    x_all, y_all = np.asarray(data.x), np.asarray(data.y)
    n = len(y_all)
    nb = num_batches(n, batch_size)
    orders: dict[int, tuple] = {}

    def batch(step: int):
        epoch, b = divmod(step, nb)
        if epoch not in orders:
            orders[epoch] = epoch_order(seed, epoch, n, batch_size)
        idx, mask = orders[epoch][0][b], orders[epoch][1][b]
        jb = gather_batch(x_all, y_all, idx, mask)
        keep = idx[mask > 0]  # the torch side sees the real examples only, as MemoryLoader does
        tx_ = torch.from_numpy(x_all[keep])
        tx_ = tx_.float().div(255) if tx_.dtype == torch.uint8 else tx_.float()
        ty = torch.from_numpy(y_all[keep])
        ty = ty.float() if torch.is_floating_point(ty) else ty.to(ttask.label_dtype)
        return jb, tx_, ty

    def torch_params():
        return state_dict_to_numpy(torch_model)

    def jax_params(state):
        return params_to_torch(jax.device_get(state.params), layout)

    torch_model.train()
    jb, tx0, ty0 = batch(0)
    jb = check_batch(state, jb)

    # 1. forward
    out_j = np.asarray(jax.jit(_forward)(state.params, state, jb["x"])[0])
    out_t = torch_model(tx0)
    check("forward", 0, "outputs", out_j[np.asarray(jb["mask"]) > 0], out_t.detach().numpy())

    # 2. loss and gradients
    (loss_j, _), grads_j = jax.jit(jax.value_and_grad(_loss_fn, has_aux=True))(state.params, state, jb)
    topt.zero_grad()
    loss_t, _ = ttask.loss_and_metrics(out_t, ty0)
    loss_t.backward()
    check("loss", 0, "loss", np.asarray(loss_j), loss_t.detach().numpy())
    grads_t = grads_to_numpy(torch_model)
    grads_jt = params_to_torch(jax.device_get(grads_j), layout)
    for name in layout.torch_names:
        check("grad", 0, name, grads_jt[name], grads_t[name])

    # 3. one optimizer step, 4. the trajectory
    for step in range(steps):
        if step > 0:
            jb, txb, tyb = batch(step)
            topt.zero_grad()
            loss_t, _ = ttask.loss_and_metrics(torch_model(txb), tyb)
            loss_t.backward()
        topt.step()
        state, metrics = train_step(state, jb)
        level = "step" if step == 0 else "trajectory"
        diverged = False
        if step > 0:
            diverged |= check(level, step, "loss", np.asarray(metrics["loss"]), loss_t.detach().numpy())
        tp, jp = torch_params(), jax_params(state)
        for name in layout.torch_names:
            diverged |= check(level, step + 1, name, jp[name], tp[name])
        report.history.append({
            "step": step + 1,
            "max_abs_diff": max(float(np.max(np.abs(jp[k] - tp[k]))) for k in layout.torch_names),
            "max_rel_l2": max(float(np.linalg.norm(jp[k] - tp[k]) / max(np.linalg.norm(tp[k]), 1e-30))
                              for k in layout.torch_names),
        })
        report.steps_checked = step + 1
        if diverged and stop_at_divergence:
            break
    return report
