"""Step-level parity between a PyTorch model and its jaxlight port, level by level.

Given a torch model and the NNX model meant to compute the same thing, :func:`check_parity`
gives both the same initial weights and batch statistics (the torch model's, converted by
``jaxlight.interop``; the layout is derived from the two models when none is given) and the
same batches in the same order (``jaxlight.data.epoch_order``: the torch side takes exactly the
examples the jaxlight side does, without the padding of the last batch), then compares

1. ``forward`` and ``forward_eval``: the outputs on the first batch in train mode (BatchNorm on
   batch statistics) and in eval mode (on the running statistics);
2. ``loss`` and ``grad``: the loss and every parameter's gradient on that batch, and with
   ``input_grads=True`` ``input_grad``: the loss's gradient with respect to every
   floating-point leaf of the batch (the model's inputs);
3. ``step``: every parameter and running statistic after one optimizer step
   (``jaxlight.optim`` against ``torch_ref.optim`` with the same arguments: SGD, SGD with
   momentum, Adam, AdamW);
4. ``trajectory``: every parameter, running statistic and the loss after each of ``steps``
   steps.

and reports the first step and the first tensor where the two differ beyond tolerance, with
the size of the difference (:class:`ParityReport`). A forward divergence names the first layer,
in torch's call order, whose output differs (torch forward hooks; on the NNX side each
submodule's output is recorded by a stand-in that calls it), or ``outputs`` when no
layer can be singled out.

The JAX side is the shipped engine, for built-in tasks and users' losses alike: a
``TrainState``, the steps of ``jaxlight.loop.EpochRunner`` one per call on padded, masked
batches (what ``loop.fit`` and the ``Trainer`` run), ``jaxlight.step.apply_grads`` for the
gradients and ``apply_predict`` for the forwards. ``ParityReport.jax_state`` is its final state.

An element ``a`` (jaxlight) against ``b`` (torch) is within tolerance when
``|a - b| <= atol + rtol * |b|`` (``numpy.allclose``'s rule). The defaults
(:data:`DEFAULT_TOLERANCES`) hold for the six models and the BatchNorm models of
``tests/parity/test_user_models.py`` in float32 on CPU; see the README and
``docs/parity-user-models.md`` for the measured worst cases. Why ``step``/``trajectory`` need
more room than ``grad``: Adam divides by ``sqrt(v) + eps``, so a gradient that is ~0 by
cancellation (its float32 rounding differs between libraries) can move by up to ``lr`` in
either direction on the first step (:class:`_RoundingNotes` tells such elements apart).

This module needs torch (the ``torch`` extra) and imports it only when called.

Example (on the synthetic regression data; ``steps=100`` on MNIST is what the tests run):
    >>> import torch_ref, jaxlight
    >>> from jaxlight.data import make_regression
    >>> data = make_regression(n_train=256, n_test=64, seed=0)
    >>> report = check_parity(torch_ref.build_model("linear"), jaxlight.build_model("linear"), "linear",
    ...                       task="regression", optimizer="sgd", lr=0.05, data=data.train, steps=2)
    >>> report.ok, report.steps_checked
    (True, 2)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from jaxlight.interop import (Layout, batch_stats_from_torch, batch_stats_to_torch, layout_for, params_from_torch,
                              params_to_torch)
from jaxlight.layers import StandIn

__all__ = ["Tolerance", "DEFAULT_TOLERANCES", "LEVELS", "Comparison", "Divergence", "ParityReport", "check_parity",
           "compare_arrays"]

LEVELS = ("forward", "forward_eval", "loss", "grad", "input_grad", "step", "trajectory")


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
    "forward_eval": Tolerance(rtol=1e-5, atol=1e-5),
    "loss": Tolerance(rtol=1e-5, atol=1e-6),
    "grad": Tolerance(rtol=1e-3, atol=1e-5),
    "input_grad": Tolerance(rtol=1e-3, atol=1e-5),
    "step": Tolerance(rtol=1e-3, atol=1e-4),
    "trajectory": Tolerance(rtol=1e-2, atol=2e-3),
}


@dataclass(frozen=True)
class Comparison:
    """One tensor compared: ``level``, ``step``, ``name`` (as in :class:`Divergence`), the largest
    difference ``max_abs = max |jax - torch|``, the same relative to the tensor's scale
    ``max_rel = max_abs / max(max |torch|, atol)`` (``atol`` the level's: a tensor of rounding
    noise is not divided by ~0), and whether the tolerance was exceeded."""

    level: str
    step: int
    name: str
    max_abs: float
    max_rel: float
    exceeded: bool


@dataclass(frozen=True)
class Divergence:
    """Where jaxlight and torch first differ beyond tolerance.

    Attributes:
        level: one of ``LEVELS``.
        step: optimizer steps taken before the comparison (0 for forward/loss/grad).
        name: the PyTorch name of a parameter or buffer (``"fc1.weight"``,
            ``"bn1.running_mean"``), of the first layer whose output differs (``"body.4"``, for
            the forward levels), ``"outputs"`` when no layer can be singled out, or ``"loss"``.
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
        what = "layer" if self.level.startswith("forward") and self.name != "outputs" else "parameter"
        return (f"{self.level} diverges at step {self.step}, {what} {self.name}: max |jax - torch| = "
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
        notes: what was not compared or was switched off (dropout, ``num_batches_tracked``),
            and under Adam the elements whose difference rounding explains (near-zero
            gradients: see the module docstring).
        jax_state: the jaxlight side's final ``TrainState`` (what ``loop.fit`` gives from the same
            initial weights on the same batches, bit for bit).
        comparisons: every tensor compared, in order (:class:`Comparison`).
        first_layers: for each forward level whose outputs differ, the torch name of the first
            layer whose output differs (when one can be singled out).
        stat_names: the torch names of the batch statistics among them (``running_mean``...).
    """

    model: str
    optimizer: str
    steps: int
    tolerances: dict
    divergence: Divergence | None = None
    worst: dict = field(default_factory=dict)
    steps_checked: int = 0
    history: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    jax_state: object = None
    comparisons: list = field(default_factory=list)
    stat_names: tuple = ()
    first_layers: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.divergence is None

    def __str__(self) -> str:
        lines = [f"parity {self.model} / {self.optimizer}, {self.steps_checked}/{self.steps} steps: "
                 + ("OK" if self.ok else "DIVERGED")]
        for level in LEVELS:
            if level in self.worst:
                d, name, step = self.worst[level]
                lines.append(f"  {level:<12} max |diff| {d:.3g} ({name}, step {step}); "
                             f"tolerance {self.tolerances[level]}")
        if self.divergence:
            lines.append(f"  first divergence: {self.divergence}")
        lines += [f"  note: {note}" for note in self.notes]
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
    # A NaN on one side counts as an infinite difference (numpy's nanmax would skip it).
    largest = float(np.max(np.where(np.isnan(diff) & (np.isnan(a) != np.isnan(b)), np.inf, np.nan_to_num(diff))))
    return exceeded, largest, tuple(int(i) for i in worst), float(a[worst]), float(b[worst])


class _Checker:
    def __init__(self, report: ParityReport):
        self.report = report

    def __call__(self, level: str, step: int, name: str, jax_value, torch_value, excuse=None) -> bool:
        """Record one comparison; True if it diverged (and it is the first divergence).

        ``excuse``: an optional :class:`_Excuse` for Adam's near-zero gradients: elements beyond
        tolerance by no more than it allows are reported in the notes, not as a divergence.
        """
        tol = self.report.tolerances[level]
        if excuse is not None:
            a = np.asarray(jax_value, np.float64)
            b = np.asarray(torch_value, np.float64)
            over = np.abs(a - b) - (tol.atol + tol.rtol * np.abs(b))
            excused = (over > 0) & (over <= excuse.allowance)
            if excused.any():
                excuse.note(level, step, name, a, b, excused)
                jax_value = np.where(excused, b, a)  # judged as agreeing; the note says why
        exceeded, d, index, ja, to = compare_arrays(jax_value, torch_value, tol)
        if excuse is not None:
            d = max(d, float(np.max(np.abs(np.asarray(a) - np.asarray(b)), initial=0.0)))
        if level not in self.report.worst or d > self.report.worst[level][0]:
            self.report.worst[level] = (d, name, step)
        # Relative to the tensor's scale, floored at atol: a tensor that is all rounding noise
        # (a gradient cancelled to ~1e-9) would otherwise show a "relative error" of 100 %.
        scale = max(float(np.max(np.abs(np.asarray(torch_value, np.float64)), initial=0.0)), tol.atol)
        rel = d / scale if scale > 0 else (0.0 if d == 0 else float("inf"))
        self.report.comparisons.append(Comparison(level, step, name, d, rel, exceeded))
        if exceeded and self.report.divergence is None:
            self.report.divergence = Divergence(level, step, name, d, index, ja, to, tol)
        return exceeded


class _Excuse:
    """What rounding explains for one parameter under Adam (see :class:`_RoundingNotes`)."""

    def __init__(self, notes: "_RoundingNotes", name: str):
        self.notes, self.name = notes, name
        self.allowance = np.where(notes.qualified[name], notes.explained[name], 0.0)

    def note(self, level, step, name, a, b, excused) -> None:
        self.notes.record(level, step, name, a, b, excused)


class _RoundingNotes:
    """Adam's gradients within rounding of zero.

    Adam moves every weight by about ``lr * m / sqrt(v)`` whatever the size of its gradient, so
    an element whose gradient is within rounding of zero (a cancellation, or a ReLU whose input
    rounds to either side of 0) can get ``2e-7`` in one framework and ``0`` in the other, and
    then move by ``lr``-sized steps on one side only for many steps. What that explains is
    measured, not guessed: both frameworks' gradients of every element are fed to Adam's
    recurrences in float64 (``beta1``, ``beta2``, ``eps`` of the run), and each step adds
    ``|update(g_jax) - update(g_torch)|`` to what the gradient difference explains. An element
    qualifies once its two gradients disagreed by more than 1e-3 of their size: far more than
    the ~1e-6 of a correct float32 sum, which in a correct port only a cancellation to near
    zero (the noise is then the whole value) or a ReLU input rounding to the other side of 0
    produces.
    An optimizer that differs (learning rate, betas, decay) is not explained: the same
    gradients give the same explained updates; nor is a parameter whose first gradient already
    differed beyond the ``grad`` tolerance (a broken model, not rounding). A difference within what is explained is reported in
    the notes (parameter, element, both gradients), not as a divergence; ordinary elements,
    whose gradients agree to ~1e-6, are judged by the usual tolerance.
    """

    def __init__(self, report: ParityReport, lr: float, batch_size: int, beta1: float = 0.9, beta2: float = 0.999,
                 eps: float = 1e-8):
        self.report, self.lr, self.batch_size = report, float(lr), int(batch_size)
        self.beta1, self.beta2, self.eps = float(beta1), float(beta2), float(eps)
        self.moments: dict[str, list] = {}
        self.explained: dict[str, np.ndarray] = {}
        self.qualified: dict[str, np.ndarray] = {}
        self.grads: dict[str, tuple] = {}
        self.t = 0
        self.noted: set = set()
        self.wrong_grads: set = set()

    def _update(self, name: str, side: int, g):
        m, v = self.moments[name][side]
        m = self.beta1 * m + (1 - self.beta1) * g
        v = self.beta2 * v + (1 - self.beta2) * g * g
        self.moments[name][side] = (m, v)
        m_hat, v_hat = m / (1 - self.beta1**self.t), v / (1 - self.beta2**self.t)
        return self.lr * m_hat / (np.sqrt(v_hat) + self.eps)

    def observe(self, grads_jax: dict, grads_torch: dict) -> None:
        self.t += 1
        for name, gt in grads_torch.items():
            gj = grads_jax.get(name)
            if gj is None:
                continue
            gj, gt = np.asarray(gj, np.float64), np.asarray(gt, np.float64)
            if name not in self.moments:
                self.moments[name] = [(0.0, 0.0), (0.0, 0.0)]
            du = np.abs(self._update(name, 0, gj) - self._update(name, 1, gt))
            self.explained[name] = self.explained.get(name, 0.0) + du
            size = np.maximum(np.abs(gj), np.abs(gt))
            near_zero = np.abs(gj - gt) > 1e-3 * size
            self.qualified[name] = self.qualified.get(name, False) | near_zero
            self.grads[name] = (gj, gt)

    def excuse(self, name: str):
        # A parameter whose first gradient already differed beyond the grad tolerance is not
        # excused: its gradients differ by a bug, not by rounding near zero.
        if name not in self.explained or not np.any(self.qualified[name]) or name in self.wrong_grads:
            return None
        return _Excuse(self, name)

    def record(self, level, step, name, a, b, excused) -> None:
        if name in self.noted:
            return
        self.noted.add(name)
        diff = np.where(excused, np.abs(a - b), -1.0)
        i = np.unravel_index(int(np.argmax(diff)), diff.shape)
        gj, gt = self.grads[name]
        self.report.notes.append(
            f"after step {step} ({level} level), {name}{list(int(k) for k in i)}: |jax - torch| = {diff[i]:.3g} beyond "
            f"tolerance, explained by rounding: its gradient was within rounding of zero (the two frameworks' gradients "
            f"differ there; at the last step jax {gj[i]:.3g}, torch {gt[i]:.3g}), and Adam turns such a difference "
            f"into steps of up to lr ({self.lr:g}); Adam on the two gradient histories explains "
            f"{float(self.explained[name][i]):.3g} ({int(excused.sum())} element(s) of {name} excused so)")


def check_parity(
    torch_model,
    jax_model,
    model: str | Layout | None = None,
    *,
    task: str | None = None,
    data,
    loss_fn: Callable | None = None,
    torch_loss_fn: Callable | None = None,
    optimizer: str = "adam",
    lr: float = 1e-3,
    optimizer_kwargs: dict | None = None,
    batch_size: int = 64,
    steps: int = 100,
    seed: int = 0,
    tolerances: dict | None = None,
    torch_optimizer: Callable | None = None,
    stop_at_divergence: bool = True,
    flatten: dict | None = None,
    torch_batch: Callable | None = None,
    input_grads: bool | tuple = False,
    own_weights: bool = False,
) -> ParityReport:
    """Run both frameworks side by side from the torch model's weights and compare them.

    Args:
        torch_model: a ``torch.nn.Module``; its current weights and running statistics are the
            starting point (it is trained in place).
        jax_model: the NNX module (its structure is used; its weights and batch statistics are
            replaced by the converted torch ones; it is not modified).
        model: the conversion layout: a built-in model's name (``jaxlight.bridge.layout_for``), a ``Layout``
            for your own pair, or None to derive it from the two models
            (``jaxlight.interop.derive_layout``, with ``flatten``).
        task: ``"regression"``, ``"binary"`` or ``"multiclass"`` (``jaxlight.tasks``), with
            ``data`` an ``ArrayDataset``. Give either ``task`` or ``loss_fn``.
        data: an ``ArrayDataset`` on the host (``x (N, ...)`` uint8 images, scaled ``/ 255`` on
            both sides for a ``task``, or float32 features; ``y (N,)`` labels or ``(N, D)``
            targets), or, with ``loss_fn``, any pytree of numpy arrays with a leading axis N
            (an ``ArrayDataset`` becomes ``{"x", "y"}``, unscaled).
        loss_fn: ``loss_fn(model, batch) -> (losses (B,), metrics)``, jaxlight's loss contract;
            ``model`` is the live NNX module (train mode for the training levels, eval mode for
            ``forward_eval``), ``batch`` the pytree of ``data`` rows as jax arrays.
        torch_loss_fn: the same for torch: ``torch_loss_fn(torch_model, batch) -> (losses (B,),
            metrics)``, ``batch`` the same rows as tensors (``torch_batch``). Required with
            ``loss_fn``.
        optimizer, lr, optimizer_kwargs: ``jaxlight.optim.make_optimizer`` and
            ``torch_ref.optim.make_optimizer`` are built from the same arguments
            (e.g. ``"sgd", momentum=0.9``).
        batch_size: examples per step; the last batch of an epoch is shorter, as
            ``DataLoader(drop_last=False)``: padded and masked on the jaxlight side, its real
            rows only on the torch side.
        steps: trajectory length (level 4); may span several epochs.
        seed: the data-order seed (``epoch_order(seed, epoch, ...)``).
        tolerances: overrides of ``DEFAULT_TOLERANCES``, by level.
        torch_optimizer: ``params -> torch.optim.Optimizer`` to use instead of
            ``torch_ref.optim`` (to check your own).
        stop_at_divergence: stop the trajectory at the first step that diverges.
        flatten: for the derived layout (``model=None``): ``{torch Linear name: (C, H, W)}``,
            see ``derive_layout``.
        torch_batch: numpy pytree -> torch pytree for ``torch_loss_fn``. Default: tensors of
            the same dtype, integers as int64 (what ``torch.nn.functional.cross_entropy`` takes).
        input_grads: also compare the gradient of the first batch's loss with respect to every
            floating-point leaf of the batch (level ``input_grad``; named by the leaf's path in
            the batch, e.g. ``['inputs'][0]``): what a model's callers backpropagate through.
            A tuple of the batch's top-level keys limits it to their leaves (``("inputs",)``:
            not the targets).
        own_weights: start the jaxlight side from ``jax_model``'s own parameters and batch
            statistics instead of converting the torch model's, to check a conversion made
            elsewhere (a port's): a weight it got wrong then shows at its layer.

    Dropout is switched off on both sides (torch ``Dropout`` modules in eval mode and
    ``MultiheadAttention``'s attention dropout at 0 for the run, NNX ``Dropout`` at rate 0): the
    two frameworks draw different masks, so their train steps cannot agree with it on. BatchNorm trains with batch statistics on both sides; see
    ``docs/parity-user-models.md`` for how ``running_var`` is compared.

    Returns:
        A :class:`ParityReport`; ``report.ok`` is False and ``report.divergence`` says where
        when anything differs beyond tolerance.

    A user's model pair and loss (``docs/parity-user-models.md``)::

        def loss_fn(model, batch):
            return optax.softmax_cross_entropy_with_integer_labels(model(batch["x"]), batch["y"]), {}

        def torch_loss_fn(model, batch):
            return F.cross_entropy(model(batch["x"]), batch["y"], reduction="none"), {}

        report = check_parity(torch_net, nnx_net, data={"x": x, "y": y}, loss_fn=loss_fn,
                              torch_loss_fn=torch_loss_fn, optimizer="adam", steps=20)
        report.divergence  # None, or where: e.g. level "forward", name "body.4"
    """
    import jax
    import torch

    import torch_ref.optim
    import torch_ref.tasks
    from flax import nnx

    from jaxlight.data.arrays import ArrayDataset, epoch_order, num_batches
    from jaxlight.interop import derive_layout
    from jaxlight.loop import EpochRunner
    from jaxlight.optim import make_optimizer
    from jaxlight.parallel import get_strategy
    from jaxlight.state import create_train_state
    from jaxlight.tasks import TASKS
    from torch_ref.interop import grads_to_numpy, state_dict_to_numpy

    layout = derive_layout(torch_model, jax_model, flatten=flatten) if model is None else layout_for(model)
    tols = {**DEFAULT_TOLERANCES, **(tolerances or {})}
    unknown = set(tols) - set(LEVELS)
    if unknown:
        raise ValueError(f"unknown tolerance level(s) {sorted(unknown)}; levels are {LEVELS}")
    if (task is None) == (loss_fn is None):
        raise ValueError("give either task= (a built-in task name) or loss_fn= (with torch_loss_fn=)")
    if loss_fn is not None and torch_loss_fn is None:
        raise ValueError("loss_fn needs its torch twin, torch_loss_fn(torch_model, batch) -> (losses, metrics)")
    if task is not None and task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {sorted(TASKS)}")
    kwargs = dict(optimizer_kwargs or {})
    opt_label = optimizer + "".join(f" {k}={v}" for k, v in kwargs.items())
    report = ParityReport(layout.name, opt_label, steps, tols, stat_names=tuple(layout.stat_names))
    check = _Checker(report)
    if layout.dropped:
        report.notes.append(f"not compared (no NNX counterpart): {', '.join(layout.dropped)}")

    # Same initial weights and statistics: the torch model's, converted.
    graphdef, template, stats_template, rest = nnx.split(jax_model, nnx.Param, nnx.BatchStat, ...)
    rest = jax.tree.map(jax.numpy.copy, rest)  # (the engine donates its state: jax_model's RNG state stays intact)
    arrays = state_dict_to_numpy(torch_model)
    if own_weights:  # (copies on the host: the engine donates its state's buffers)
        params, stats = jax.tree.map(np.array, jax.device_get((template, stats_template)))
    else:
        params = params_from_torch(arrays, template, layout)
        stats = batch_stats_from_torch(arrays, stats_template, layout)
    tx = make_optimizer(optimizer, lr, **kwargs)
    topt = (torch_optimizer or (lambda p: torch_ref.optim.make_optimizer(optimizer, p, lr, **kwargs)))(
        torch_model.parameters())
    dropouts = _torch_dropouts(torch_model)
    if dropouts or _nnx_dropouts(jax_model):
        report.notes.append("dropout off on both sides (torch: " + (", ".join(dropouts) or "none") + ")")

    if task is not None:
        ttask = torch_ref.tasks.TASKS[task]()
        jloss = TASKS[task]()
        torch_loss_fn = _task_torch_loss_fn(ttask)
        data_tree = {"x": np.asarray(data.x), "y": np.asarray(data.y)}
    else:
        jloss = loss_fn
        data_tree = jax.tree.map(np.asarray, data.data if isinstance(data, ArrayDataset) else data)
    leaves = jax.tree.leaves(data_tree)
    n = len(leaves[0])
    if any(len(a) != n for a in leaves):
        raise ValueError(f"data leaves have different lengths {[len(a) for a in leaves]}")
    to_torch = torch_batch or (_task_torch_batch(ttask) if task is not None else _default_torch_batch)

    # The jaxlight side is the engine itself: a TrainState, the epoch runner and the pure steps
    # that loop.fit and the Trainer run, on padded and masked batches.
    state = create_train_state(_without_dropout(nnx.merge(graphdef, params, stats, rest)), tx, jloss, seed)
    dataset = ArrayDataset(data_tree)
    strategy = get_strategy("single")
    nb = num_batches(n, batch_size)
    orders: dict[int, tuple] = {}

    def batch(step: int):
        """``(padded, mask, torch batch)`` of a step: the runner's batch and its real rows."""
        epoch, b = divmod(step, nb)
        if epoch not in orders:
            orders[epoch] = epoch_order(seed, epoch, n, batch_size)
        idx, mask = orders[epoch][0][b], orders[epoch][1][b]
        padded = jax.tree.map(lambda a: a[idx], data_tree)
        real = jax.tree.map(lambda a: a[idx[mask > 0]], data_tree)
        return padded, mask, to_torch(real)

    def torch_losses(tb):
        losses, _ = torch_loss_fn(torch_model, tb)
        if tuple(losses.shape) != (len(jax.tree.leaves(tb)[0]),):
            raise ValueError(f"torch_loss_fn must return per-example losses of shape (B,), got {tuple(losses.shape)}")
        return losses.mean()

    adam = _is_adam(optimizer, torch_optimizer, topt)
    rounding = _RoundingNotes(report, lr, batch_size, *_adam_constants(kwargs, topt)) if adam else None
    bn = _BatchNormTracker(torch_model, layout, jax_model)
    no_dropout = _TorchNoDropout()
    try:
        padded0, mask0, tb0 = batch(0)
        real0 = np.asarray(mask0) > 0
        inputs = _float_leaves(padded0, tb0, None if input_grads is True else input_grads) if input_grads else {}
        for leaf in inputs.values():
            leaf[1].requires_grad_(True)

        # 1. forward, eval mode and train mode, layer by layer where a layer diverges. Eval
        # first: torch's train-mode forward moves its running statistics.
        _torch_mode(torch_model, False)
        with torch.no_grad(), _TorchCapture(torch_model, layout) as cap_te, no_dropout:
            torch_loss_fn(torch_model, tb0)
        _torch_mode(torch_model, True)
        with _TorchCapture(torch_model, layout) as cap_t, no_dropout:
            loss_t = torch_losses(tb0)  # the same forward is differentiated below
        for level, cap, train in (("forward", cap_t, True), ("forward_eval", cap_te, False)):
            out_j, calls_j = _forward(state, padded0, mask0, train)
            # The real rows of the outputs that keep the batch axis (an RNN's final state
            # (layers, B, H) does not; it is compared whole).
            out_j = [a[real0] if a.shape[:1] == real0.shape else a for a in out_j]
            ref = cap.outputs()
            if not ref and level == "forward":
                report.notes.append("torch_loss_fn does not call the torch model itself: no outputs compared")
            if len(out_j) != len(ref):
                raise ValueError(f"the model's outputs have {len(out_j)} arrays in jaxlight, {len(ref)} in torch")
            exceeded = [check(level, 0, "outputs", a, b) for a, b in zip(out_j, ref)]
            if any(exceeded):
                layer = _first_layer([(p, [a[real0] if a.shape[:1] == real0.shape else a for a in leaves])
                                      for p, leaves in calls_j], cap, layout, report.tolerances[level])
                if layer is not None:
                    report.first_layers[level] = layer[0]
                    if report.divergence.level == level and report.divergence.name == "outputs":
                        report.divergence = Divergence(level, 0, *layer, report.tolerances[level])

        # 2. loss and gradients: the engine's own gradient (the first half of its train step).
        grads_j, metrics_j, _ = jax.device_get(_grads_jit(state, padded0, mask0))
        topt.zero_grad()
        loss_t.backward()
        check("loss", 0, "loss", np.asarray(metrics_j["loss"]), loss_t.detach().numpy())
        grads_t = grads_to_numpy(torch_model)
        grads_jt = params_to_torch(grads_j, layout)
        for name in layout.torch_names:
            if check("grad", 0, name, grads_jt[name], grads_t[name]) and rounding is not None:
                rounding.wrong_grads.add(name)
        if input_grads:
            if not inputs:
                report.notes.append("input gradients: the batch has no floating-point leaf")
            grads_x = jax.device_get(_input_grads_jit(state, padded0, mask0, tuple(i for i, _ in inputs.values())))
            for (name, (_, leaf_t)), g in zip(inputs.items(), grads_x):
                g_t = leaf_t.grad
                check("input_grad", 0, name, np.asarray(g)[real0],
                      np.zeros(tuple(leaf_t.shape), np.float32) if g_t is None else g_t.detach().numpy())

        # 3. one optimizer step, 4. the trajectory: the epoch runner's steps, one per call.
        step, epoch = 0, 0
        while step < steps:
            runner = EpochRunner(state, dataset, epoch, batch_size, strategy, 1)
            runner.next_length = 1
            for state, metrics, _ in runner:
                loss_j = np.asarray(jax.device_get(metrics["loss"])[0])
                if step > 0:
                    _, _, tb = batch(step)
                    topt.zero_grad()
                    with no_dropout:
                        loss_t = torch_losses(tb)
                    loss_t.backward()
                    grads_t = grads_to_numpy(torch_model)
                if rounding is not None:
                    rounding.observe(grads_jt, grads_t)
                topt.step()
                bn.after_step(torch_model)
                level = "step" if step == 0 else "trajectory"
                diverged = False
                if step > 0:
                    diverged |= check(level, step, "loss", loss_j, loss_t.detach().numpy())
                tp = state_dict_to_numpy(torch_model)
                jp = params_to_torch(jax.device_get(state.params), layout)
                for name in layout.torch_names:
                    excuse = rounding.excuse(name) if rounding is not None else None
                    diverged |= check(level, step + 1, name, jp[name], tp[name], excuse)
                if layout.stat_names:
                    js = batch_stats_to_torch(jax.device_get(nnx.filter_state(state.model_state, nnx.BatchStat)), layout)
                    for name in layout.stat_names:
                        diverged |= check(level, step + 1, name, js[name], bn.expected(name, tp[name]))
                report.history.append({
                    "step": step + 1,
                    "max_abs_diff": max(float(np.max(np.abs(jp[k] - tp[k]))) for k in layout.torch_names),
                    "max_rel_l2": max(float(np.linalg.norm(jp[k] - tp[k]) / max(np.linalg.norm(tp[k]), 1e-30))
                                      for k in layout.torch_names),
                })
                step += 1
                report.steps_checked = step
                if (diverged and stop_at_divergence) or step >= steps:
                    break
                if rounding is not None:  # the next step's gradient, from the state the runner holds now
                    padded, mask, _ = batch(step)
                    grads_jt = params_to_torch(jax.device_get(_grads_jit(state, padded, mask)[0]), layout)
                runner.next_length = 1
            else:
                epoch += 1
                continue
            break
    finally:
        bn.close()
        torch_model.train()
    if no_dropout.seen:
        report.notes.append("dropout in torch functions switched off on the torch side: " + ", ".join(sorted(no_dropout.seen)))
    report.jax_state = state
    return report


# ----------------------------------------------------------------------------------------- #
# Helpers: the torch side of a built-in task, dropout, optimizer constants, the engine's forward.


def _task_torch_loss_fn(ttask):
    """A built-in task's torch twin on ``{"x", "y"}`` batches (``x`` already scaled)."""

    def torch_loss_fn(model, batch):
        return ttask.per_example_loss(model(batch["x"]), batch["y"]), {}

    return torch_loss_fn


def _task_torch_batch(ttask):
    import torch

    def convert(real):
        x = torch.from_numpy(real["x"])
        x = x.float().div(255) if x.dtype == torch.uint8 else x.float()
        y = torch.from_numpy(real["y"])
        y = y.float() if torch.is_floating_point(y) else y.to(ttask.label_dtype)
        return {"x": x, "y": y}

    return convert


def _default_torch_batch(real):
    import jax
    import torch

    def one(a):
        a = np.asarray(a)
        if np.issubdtype(a.dtype, np.integer):
            a = a.astype(np.int64)
        return torch.from_numpy(np.array(a))

    return jax.tree.map(one, real)


def _without_dropout(model):
    """``model`` (the parity run's own copy) with every ``nnx.Dropout`` at rate 0 (see
    ``check_parity``: the two frameworks draw different masks)."""
    from flax import nnx

    for _, m in nnx.iter_modules(model):
        if isinstance(m, nnx.Dropout):
            m.rate = 0.0
    return model


def _adam_constants(kwargs: dict, topt) -> tuple:
    """``(beta1, beta2, eps)`` of the jaxlight side's Adam (``jaxlight.optim``'s defaults)."""
    betas = kwargs.get("betas", (kwargs.get("b1", 0.9), kwargs.get("b2", 0.999)))
    return float(betas[0]), float(betas[1]), float(kwargs.get("eps", 1e-8))


def _is_adam(optimizer: str, torch_optimizer, topt) -> bool:
    """Whether the step divides by a running RMS of the gradient (Adam, AdamW...)."""
    if torch_optimizer is not None:
        return "adam" in type(topt).__name__.lower()
    return "adam" in optimizer.lower()


def _nnx_dropouts(jax_model) -> list:
    from flax import nnx

    return [p for p, m in nnx.iter_modules(jax_model) if isinstance(m, nnx.Dropout) and m.rate > 0]


def _torch_dropouts(torch_model) -> list[str]:
    from torch.nn.modules.dropout import _DropoutNd

    return [n for n, m in torch_model.named_modules() if isinstance(m, _DropoutNd) and m.p > 0]


def _TorchNoDropout():
    """A ``torch.overrides.TorchFunctionMode`` under which torch's dropout is the identity: the
    functional forms a ``forward`` calls itself (``F.dropout(x, p, self.training)``), the
    attention dropout of ``F.scaled_dot_product_attention`` and of ``nn.MultiheadAttention``
    (``F.multi_head_attention_forward``), which no module mode reaches. ``seen``: the functions
    it switched off."""
    import torch
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode

    identity = {F.dropout, F.alpha_dropout, F.feature_alpha_dropout, F.dropout1d, F.dropout2d, F.dropout3d,
                torch.dropout, torch.alpha_dropout, torch.feature_dropout, torch.feature_alpha_dropout}

    class NoDropout(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.seen: set = set()

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = dict(kwargs or {})
            if func in identity:
                self.seen.add(f"{func.__module__}.{func.__name__}")
                return args[0] if args else kwargs["input"]
            if func is F.scaled_dot_product_attention:
                p = kwargs.get("dropout_p", args[4] if len(args) > 4 else 0.0)
                if p:
                    self.seen.add("scaled_dot_product_attention(dropout_p)")
                    if len(args) > 4:
                        args = (*args[:4], 0.0, *args[5:])
                    else:
                        kwargs["dropout_p"] = 0.0
            elif func is F.multi_head_attention_forward and kwargs.get("training", True):
                self.seen.add("MultiheadAttention(dropout)")
                kwargs["training"] = False  # (its only use there: the attention dropout)
            return func(*args, **kwargs)

    return NoDropout()


def _torch_mode(torch_model, train: bool) -> None:
    from torch.nn.modules.dropout import _DropoutNd

    torch_model.train(train)
    for m in torch_model.modules():
        if isinstance(m, _DropoutNd):
            m.eval()


# ----------------------------------------------------------------------------------------- #
# The jaxlight side: the engine's pure pieces, jitted here only to be run eagerly from Python


def _float_leaves(padded, torch_batch, keys=None) -> dict:
    """``{path: (index among the jax batch's leaves, torch tensor)}`` of the batch leaves that
    are floating point on both sides, by their path in the batch (``['inputs'][0]``); with
    ``keys``, only those under these top-level keys."""
    import jax
    import torch

    torch_leaves = {jax.tree_util.keystr(p): t for p, t in jax.tree_util.tree_flatten_with_path(torch_batch)[0]}
    out = {}
    for i, (p, a) in enumerate(jax.tree_util.tree_flatten_with_path(padded)[0]):
        name = jax.tree_util.keystr(p)
        if keys is not None and not (p and getattr(p[0], "key", getattr(p[0], "idx", None)) in keys):
            continue
        t = torch_leaves.get(name)
        if isinstance(t, torch.Tensor) and t.is_floating_point() and np.issubdtype(np.asarray(a).dtype, np.floating):
            out[name] = (i, t)
    return out


def _input_grads_jit(state, batch, mask, which: tuple):
    """The gradient of the engine's loss (the one ``apply_grads`` differentiates, train mode)
    with respect to the batch leaves ``which`` (their positions among the leaves)."""
    import jax

    key = tuple(which)
    if key not in _INPUT_GRADS:
        from jaxlight.step import _loss_for_grad

        def grads(state, batch, mask):
            leaves, treedef = jax.tree.flatten(batch)

            def loss(xs):
                full = list(leaves)
                for i, x in zip(key, xs):
                    full[i] = x
                return _loss_for_grad(state.params, state, jax.tree.unflatten(treedef, full), mask, None)[0]

            return jax.grad(loss)([leaves[i] for i in key])

        _INPUT_GRADS[key] = jax.jit(grads)
    return _INPUT_GRADS[key](state, batch, mask)


_INPUT_GRADS: dict = {}


def _grads_jit(state, batch, mask):
    import jax

    from jaxlight.step import apply_grads

    global _GRADS
    if _GRADS is None:
        _GRADS = jax.jit(apply_grads)
    return _GRADS(state, batch, mask)


_GRADS = None


def _forward(state, batch, mask, train: bool):
    """``(output leaves, layer calls)`` of the engine's forward (``jaxlight.step.apply_predict``,
    train- or eval-mode graph, padding rows included), with every submodule's output recorded
    by path (``[(path, leaves)]``, in call order)."""
    import jax
    from flax import nnx

    from jaxlight.layers import GlobalRowsDropout, PaddedBatchNorm, swapped
    from jaxlight.step import apply_predict, model_outputs

    paths: list = []

    def capture(model, batch):
        calls = []

        def make(layer, path):  # every layer and stand-in; containers are not called
            if isinstance(layer, (nnx.List, nnx.Dict)):
                return None
            return _Recorder(layer, tuple(path.split(".")), calls)

        with swapped(model, make, kinds=(nnx.Module, PaddedBatchNorm, GlobalRowsDropout)):
            out = model_outputs(state.loss_fn, model, batch, mask)
        paths[:] = [p for p, _ in calls]
        return jax.tree.leaves(out), [leaves for _, leaves in calls]

    out, layer_leaves = jax.device_get(jax.jit(apply_predict, static_argnames=("axis_name", "predict_fn", "train"))(
        state, batch, mask, predict_fn=capture, train=train))
    return [np.asarray(a) for a in out], [(p, [np.asarray(a) for a in leaves]) for p, leaves in zip(paths, layer_leaves)]


class _Recorder(StandIn):
    """Stands in for one submodule while the parity forward is traced: calls it and records its
    output leaves under its path (NNX has no forward hooks)."""

    def __init__(self, layer, path: tuple, calls: list):
        super().__init__(layer)
        self.path, self.calls = path, calls

    def __call__(self, *args, **kwargs):
        import jax

        out = self.wrapped(*args, **kwargs)
        self.calls.append((self.path, list(jax.tree.leaves(out))))
        return out


# ----------------------------------------------------------------------------------------- #
# Layer outputs on both sides


def _torch_leaves(out) -> list[np.ndarray]:
    import torch

    if isinstance(out, torch.Tensor):
        return [out.detach().cpu().numpy()]
    if isinstance(out, (tuple, list)):
        return [a for o in out for a in _torch_leaves(o)]
    if isinstance(out, dict):
        return [a for k in sorted(out) for a in _torch_leaves(out[k])]
    return []


class _TorchCapture:
    """Forward hooks on the root and on every layer of the layout: each call's output leaves,
    in call order."""

    def __init__(self, torch_model, layout: Layout):
        self.model, self.layout = torch_model, layout
        self.calls: list[tuple[str, list]] = []
        self.types: dict[str, object] = {}

    def __enter__(self):
        mods = dict(self.model.named_modules())
        self.handles = []
        for name in [""] + [n for n in self.layout.modules if n in mods and n != ""]:
            mod = mods[name]
            self.types[name] = mod
            self.handles.append(mod.register_forward_hook(
                lambda m, a, out, name=name: self.calls.append((name, _torch_leaves(out)))))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def outputs(self) -> list:
        return next((o for n, o in reversed(self.calls) if n == ""), [])


def _submodule(model, path: tuple):
    """The NNX submodule at ``path`` (attribute names, list indices), or None."""
    for key in path:
        if model is None:
            return None
        try:
            model = getattr(model, key) if hasattr(model, key) else model[int(key) if key.isdigit() else key]
        except (KeyError, IndexError, TypeError, ValueError):
            return None
    return model


def _to_nnx_layout(torch_module, a: np.ndarray) -> np.ndarray:
    """A torch layer's output in NNX's layout: channels-first feature maps of convolutions and
    batch norms (NCHW, NCL) become channels-last."""
    kind = type(torch_module).__name__
    if a.ndim >= 3 and (kind.startswith("Conv") or kind.startswith("BatchNorm")):
        return np.moveaxis(a, 1, -1)
    return a


def _first_layer(jax_calls, torch_capture: _TorchCapture, layout: Layout, tol: Tolerance):
    """``(name, max_abs_diff, index, jax, torch)`` of the first layer, in torch's call order,
    whose output differs beyond ``tol``; None when no layer can be compared."""
    by_path: dict[tuple, list] = {}
    for path, leaves in jax_calls:
        by_path.setdefault(path, []).append(leaves)
    seen: dict[str, int] = {}
    for name, leaves_t in torch_capture.calls:
        if name == "":
            continue
        k = seen[name] = seen.get(name, -1) + 1
        jax_calls_of = by_path.get(layout.modules[name], [])
        if k >= len(jax_calls_of) or not leaves_t:
            continue
        mod = torch_capture.types[name]
        a, b = jax_calls_of[k][0], _to_nnx_layout(mod, leaves_t[0])
        if a.shape != b.shape:
            if a.size != b.size or np.squeeze(a).shape != np.squeeze(b).shape:
                continue
            a, b = np.squeeze(a), np.squeeze(b)
        exceeded, d, index, ja, to = compare_arrays(a, b, tol)
        if exceeded:
            return name, d, index, ja, to
    return None


class _BatchNormTracker:
    """What NNX's ``var`` should be, from torch's ``running_var``.

    Both frameworks normalise a training batch with its biased variance, but PyTorch's
    ``running_var`` averages the *unbiased* one, ``n / (n - 1)`` times larger, where ``n`` is
    the number of values per channel in the batch (``B``, or ``B*H*W`` for ``BatchNorm2d``);
    NNX's ``var`` averages the biased one. From torch's update
    ``rv_t = (1 - m) rv_{t-1} + m * n/(n-1) * v_t`` the NNX value follows exactly:
    ``e_t = (1 - m) e_{t-1} + (n-1)/n * (rv_t - (1 - m) rv_{t-1})``, starting from the converted
    ``e_0 = rv_0``. ``running_mean`` is the same in both and is compared directly, and so is the
    ``var`` of an NNX layer that averages torch's unbiased estimate itself (its class says
    ``unbiased_running_var = True``: ``jaxlight.bridge.porting.nn``'s batch norms)."""

    def __init__(self, torch_model, layout: Layout, jax_model=None):
        mods = dict(torch_model.named_modules())
        self.mods = {}
        self.handles = []
        self.n: dict[str, int] = {}
        for name in layout.stat_names:
            rule = layout.rule(name)
            if name.endswith("running_var") and not getattr(_submodule(jax_model, rule.jax_path[:-1]),
                                                            "unbiased_running_var", False):
                mname = name[: -len(".running_var")]
                m = mods[mname]
                self.mods[name] = m
                self.handles.append(m.register_forward_pre_hook(
                    lambda mod, args, name=name: self.n.__setitem__(name, args[0].numel() // args[0].shape[1])))
        self.prev = {k: m.running_var.detach().numpy().astype(np.float64).copy() for k, m in self.mods.items()}
        self.expect = {k: v.copy() for k, v in self.prev.items()}

    def after_step(self, torch_model) -> None:
        for name, m in self.mods.items():
            rv = m.running_var.detach().numpy().astype(np.float64)
            n = self.n.get(name)
            if n is not None and n > 1:
                mom = float(m.momentum)
                self.expect[name] = (1 - mom) * self.expect[name] + (n - 1) / n * (rv - (1 - mom) * self.prev[name])
            self.prev[name] = rv.copy()
            self.n.pop(name, None)

    def expected(self, name: str, torch_value):
        return self.expect.get(name, torch_value)

    def close(self) -> None:
        for h in self.handles:
            h.remove()
