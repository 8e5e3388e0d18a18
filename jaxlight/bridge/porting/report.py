"""The parity report of a port: does the NNX model compute what the torch module computes?

:func:`check_port` runs ``jaxlight.bridge.parity.check_parity`` (the shipped engine: a ``TrainState``,
``jaxlight.step.apply_grads``, the steps of ``jaxlight.loop.EpochRunner`` one per call, on the
padded, masked batches ``loop.fit`` and the ``Trainer`` run) twice on copies of the torch module,
once with SGD with momentum and once with Adam, from the port's own weights (``own_weights``:
the conversion itself is under test), on the example inputs as one batch and the report's loss.
One table, one row per check:

==========================  =====================================================================
weights                     ``Port.model``'s parameters and batch statistics, converted back to
                            torch's layout, against the ``state_dict``: exact (0)
forward (train)             the outputs in train mode (BatchNorm on the batch's statistics)
forward (eval)              the outputs in eval mode (BatchNorm on the running statistics)
loss                        the loss on the batch
input gradient              d loss / d input, every floating-point input
parameter gradients         d loss / d parameter, every parameter
k steps SGD (momentum 0.9)  every parameter and the loss after each of k steps
k steps Adam                the same with Adam
BatchNorm running stats     ``running_mean`` / ``running_var`` after each step of both runs
==========================  =====================================================================

Each row gives the largest absolute difference, the largest relative one (``max |jax - torch|
/ max |torch|`` of a tensor), the tolerance (``jaxlight.bridge.parity.DEFAULT_TOLERANCES``: an element
agrees when ``|jax - torch| <= atol + rtol |torch|``), pass or FAIL, and where it first fails:
the torch module name of the first layer whose output differs (forward rows; torch forward hooks
against the NNX submodule of the same name) or of the parameter. Dropout is off on both sides
while checking (the two frameworks draw different masks); the notes say so.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np

__all__ = ["PortReport", "Row", "check_port", "resolve_loss", "as_input_tuple", "to_numpy", "SGD", "ADAM"]

# (optimizer, lr, kwargs) of the two runs: a learning rate that moves the weights visibly in a
# few steps without leaving the region where float32 rounding stays small.
SGD = ("sgd", 0.01, {"momentum": 0.9})
ADAM = ("adam", 1e-3, {})


@dataclass
class Row:
    """One check of the report. ``max_abs``/``max_rel`` are None when nothing was compared
    (``note`` says why); ``where`` names the first failing layer or parameter (torch names)."""

    check: str
    max_abs: float | None
    max_rel: float | None
    tolerance: str
    ok: bool
    where: str = ""
    note: str = ""


@dataclass
class PortReport:
    """What :func:`check_port` found.

    Attributes:
        rows: the table, one :class:`Row` per check.
        parity: ``{"sgd": ParityReport, "adam": ParityReport}``, the two engine runs in full.
        title: the table's first line (model, batch, steps).
        notes: what was switched off or explained (dropout, ``num_batches_tracked``, Adam's
            rounding notes).
    """

    rows: list
    parity: dict
    title: str
    notes: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every check passes."""
        return all(r.ok for r in self.rows)

    @property
    def first_difference(self) -> str | None:
        """Where the port first differs: ``"layer conv1 (forward (train))"``, or None."""
        failed = next((r for r in self.rows if not r.ok), None)
        return None if failed is None else f"{failed.where or 'outputs'} ({failed.check})"

    def table(self) -> str:
        def num(v):
            return "-" if v is None else f"{v:.2e}"

        head = ("check", "max abs err", "max rel err", "tolerance", "result", "first difference")
        body = [(r.check, num(r.max_abs), num(r.max_rel), r.tolerance, "pass" if r.ok else "FAIL",
                 r.where or r.note) for r in self.rows]
        widths = [max(len(str(line[i])) for line in [head, *body]) for i in range(len(head))]
        fmt = lambda line: "  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip()  # noqa: E731
        return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, body)])

    def __str__(self) -> str:
        verdict = ("parity holds" if self.ok else f"parity FAILS: first difference at {self.first_difference}")
        return "\n".join([self.title, self.table(), verdict] + [f"note: {n}" for n in self.notes])


# --------------------------------------------------------------------------------------------
# Inputs, targets and the loss


def as_input_tuple(example_inputs) -> tuple:
    """``example_inputs`` as a tuple of torch tensors; raises ``ValueError`` naming the one that
    is not a tensor."""
    import torch

    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if not inputs:
        raise ValueError("example_inputs is empty; give the tensors forward takes, e.g. (torch.randn(8, 3, 32, 32),)")
    for i, x in enumerate(inputs):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"example_inputs[{i}] is a {type(x).__name__}, not a torch.Tensor")
    return inputs


def to_numpy(x) -> np.ndarray:
    """A tensor or array as numpy; int64 becomes int32 (JAX's default integer; torch gets int64
    back in the report's batches)."""
    import torch

    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return a.astype(np.int32) if a.dtype == np.int64 else a


def _outputs(torch_module, inputs: tuple):
    import torch

    model = copy.deepcopy(torch_module).eval()
    with torch.no_grad():
        return model(*inputs)


def resolve_loss(torch_module, inputs: tuple, loss, targets, seed: int):
    """``((loss_fn, torch_loss_fn), target, kind)`` for the report: the user's pair, or the
    default for the module's outputs (:mod:`jaxlight.bridge.porting.task`) with labels or a target drawn
    from ``seed``. ``kind`` is ``"cross_entropy"``, ``"mse"`` or None (the user's loss)."""
    import torch

    from jaxlight.bridge.porting import task

    rng = np.random.default_rng(seed)
    if loss is not None:
        if not (isinstance(loss, (tuple, list)) and len(loss) == 2 and all(callable(f) for f in loss)):
            raise ValueError("loss must be a pair (loss_fn, torch_loss_fn): jaxlight's loss contract on both sides, "
                             "loss_fn(model, batch) -> (losses (B,), metrics)")
        kind = None
        pair = tuple(loss)
    else:
        pair = None
    out = _outputs(torch_module, inputs) if (loss is None or targets is None) else None
    b = inputs[0].shape[0]
    if out is not None and loss is None:
        kind = ("cross_entropy" if isinstance(out, torch.Tensor) and out.is_floating_point() and out.ndim == 2
                and out.shape[0] == b and out.shape[1] >= 2 else "mse")
        pair = task.LOSSES[kind][:2]
    if targets is not None:
        import jax

        target = jax.tree.map(to_numpy, tuple(targets) if isinstance(targets, list) else targets)
    elif kind == "cross_entropy":
        target = rng.integers(0, out.shape[1], size=b).astype(np.int32)
    else:
        leaves = [a for a in task._torch_leaves(out) if a.is_floating_point()]
        if kind == "mse" and not leaves:
            raise ValueError("the module returns no floating-point output: give loss=(loss_fn, torch_loss_fn) "
                             "and targets= for the report")
        target = tuple(rng.standard_normal(tuple(a.shape)).astype(np.float32) for a in leaves)
    return pair, target, kind


# --------------------------------------------------------------------------------------------
# The report


def jax_leaves(tree) -> list:
    import jax

    return jax.tree.leaves(tree)


def _tol(t) -> str:
    return f"{t.atol:g} + {t.rtol:g}|t|"


def _module_of(name: str, stats: tuple, params: set) -> str:
    """The torch module a parameter or buffer name belongs to, with the name itself."""
    if name in params or name in stats:
        owner = name.rpartition(".")[0] or "(top level)"
        return f"{owner} ({name})"
    return name


def _row(check: str, comparisons: list, tolerance: str, parity=None, names=(), stats=()) -> Row:
    if not comparisons:
        return Row(check, None, None, tolerance, True, note="nothing to compare")
    failed = next((c for c in comparisons if c.exceeded), None)
    where = ""
    if failed is not None:
        what = (parity.first_layers.get(failed.level, failed.name) if parity is not None and failed.level.startswith(
            "forward") else failed.name)
        if failed.level.startswith("forward"):
            where = "outputs (every layer with weights agrees)" if what == "outputs" else f"layer {what}"
        else:
            where = _module_of(what, stats, set(names))
        if failed.step:
            where += f", step {failed.step}"
    return Row(check, max(c.max_abs for c in comparisons), max(c.max_rel for c in comparisons), tolerance,
               failed is None, where)


def _weights_row(torch_module, translation) -> Row:
    """``Port.model``'s weights, converted back to torch's layout, against the ``state_dict``."""
    from jaxlight.interop import model_to_torch
    from jaxlight.bridge.parity import Tolerance, compare_arrays
    from torch_ref.interop import state_dict_to_numpy

    mine = model_to_torch(translation.model, translation.layout)
    theirs = state_dict_to_numpy(torch_module)
    worst, worst_rel, where = 0.0, 0.0, ""
    for name, a in mine.items():
        b = theirs[name]
        if a.shape != b.shape:
            return Row("weights", None, None, "exact", False, f"{_module_of(name, (), {name})}: shape {a.shape}, "
                                                               f"torch {b.shape}")
        exceeded, d, *_ = compare_arrays(a, b, Tolerance(0.0, 0.0))
        scale = float(np.max(np.abs(b), initial=0.0))
        worst, worst_rel = max(worst, d), max(worst_rel, d / scale if scale else (0.0 if d == 0 else np.inf))
        if exceeded and not where:
            where = _module_of(name, (), {name})
    missing = [k for k in theirs if k not in mine and k not in translation.layout.dropped]
    if missing and not where:
        where = f"{missing[0]} has no place in the port"
    return Row("weights", worst, worst_rel, "exact", not where, where)


def _is_batch_norm(module) -> bool:
    from torch.nn.modules.batchnorm import _BatchNorm

    return isinstance(module, _BatchNorm)


def check_port(torch_module, translation, inputs: tuple, target, loss: tuple, *, steps: int = 3,
               tolerances: dict | None = None, loss_kind: str | None = None) -> PortReport:
    """The report of one port (see the module docstring).

    Args:
        torch_module: the original (not modified: each run trains a deep copy).
        translation: ``jaxlight.bridge.porting.translate.translate``'s result (``model``, ``layout``).
        inputs: the example inputs as numpy arrays (one batch of ``B`` rows).
        target: the batch's ``"target"``.
        loss: ``(loss_fn, torch_loss_fn)`` on ``{"inputs", "target"}`` batches.
        steps: optimizer steps per run.
        tolerances: overrides of ``jaxlight.bridge.parity.DEFAULT_TOLERANCES``.
        loss_kind: for the title (``"cross_entropy"``, ``"mse"``; None: the user's loss).
    """
    from jaxlight.bridge.parity import DEFAULT_TOLERANCES, check_parity

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    from jaxlight.bridge.porting import task

    data = {"inputs": tuple(inputs), "target": target}
    batched = task.batch_first(data)
    if not batched:  # (not batch-first: the example set as one row of a batch of one; see jaxlight.bridge.porting.task)
        import jax

        data = jax.tree.map(lambda a: np.asarray(a)[None], data)
        loss = (task.unbatched(loss[0]), task.torch_unbatched(loss[1]))
    b = int(np.shape(jax_leaves(data)[0])[0])
    layout = translation.layout
    tols = {**DEFAULT_TOLERANCES, **(tolerances or {})}
    runs = {}
    for label, (opt, lr, kwargs) in (("sgd", SGD), ("adam", ADAM)):
        runs[label] = check_parity(copy.deepcopy(torch_module), translation.model, layout, data=data, loss_fn=loss[0],
                                   torch_loss_fn=loss[1], optimizer=opt, lr=lr, optimizer_kwargs=kwargs, batch_size=b,
                                   steps=steps, tolerances=tolerances, stop_at_divergence=False,
                                   input_grads=("inputs",) if label == "sgd" else False,
                                   own_weights=True)
    sgd, adam = runs["sgd"], runs["adam"]
    stats = tuple(layout.stat_names)
    names = set(layout.torch_names)
    norms = {n for n, m in torch_module.named_modules() if _is_batch_norm(m)}
    bn_stats = {s for s in stats if s.rpartition(".")[0] in norms}

    def of(report, *levels, stat: bool | None = None):
        """The comparisons of ``levels``; ``stat``: only (True) or but (False) batch-norm statistics."""
        return [c for c in report.comparisons if c.level in levels
                and (stat is None or (c.name in bn_stats) == stat)]

    steps_tol = _tol(tols["step"]) + (f"; later {_tol(tols['trajectory'])}" if steps > 1 else "")
    rows = [
        _weights_row(torch_module, translation),
        _row("forward (train)", of(sgd, "forward"), _tol(tols["forward"]), sgd, names, stats),
        _row("forward (eval)", of(sgd, "forward_eval"), _tol(tols["forward_eval"]), sgd, names, stats),
        _row("loss", of(sgd, "loss"), _tol(tols["loss"]), sgd, names, stats),
        _row("input gradient", of(sgd, "input_grad"), _tol(tols["input_grad"]), sgd, names, stats),
        _row("parameter gradients", of(sgd, "grad"), _tol(tols["grad"]), sgd, names, stats),
        _row(f"{steps} step(s) SGD momentum {SGD[2]['momentum']:g}", of(sgd, "step", "trajectory", stat=False),
             steps_tol, sgd, names, stats),
        _row(f"{steps} step(s) Adam", of(adam, "step", "trajectory", stat=False), steps_tol, adam, names,
             stats),
    ]
    bn = of(sgd, "step", "trajectory", stat=True) + of(adam, "step", "trajectory", stat=True)
    rows.append(_row("BatchNorm running stats", bn, steps_tol, None, names, stats) if bn_stats else
                Row("BatchNorm running stats", None, None, "-", True, note="no BatchNorm in the model"))
    if not of(sgd, "input_grad"):
        rows[4] = Row("input gradient", None, None, "-", True, note="no floating-point input")
    torch_name = type(torch_module).__name__
    loss_name = {"cross_entropy": "cross-entropy on drawn labels", "mse": "squared error to a drawn target",
                 None: "your loss"}[loss_kind]
    what = f"batch of {b}" if batched else "the examples as one batch (not batch-first)"
    title = (f"jaxlight port: {torch_name} (torch) -> {translation.module_name}.{translation.class_name} (NNX); "
             f"{what}, {loss_name}, {steps} step(s) SGD lr {SGD[1]:g} and Adam lr {ADAM[1]:g}")
    notes = list(dict.fromkeys(sgd.notes + adam.notes))
    return PortReport(rows, runs, title, notes)
