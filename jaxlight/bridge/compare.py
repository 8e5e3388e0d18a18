"""``jaxlight compare``: convergence parity. Both frameworks, trained independently, same recipe.

Each framework draws its own initial weights (from the same distributions: PyTorch's defaults,
``jaxlight.models.init``) and shuffles with its own generator, over several seeds; the question
is whether they reach the same test metric, not the same bits (for that, see
``jaxlight.bridge.parity``). The two means agree when their difference is within

    tolerance = max(Z * sqrt(std_jax**2 / K + std_torch**2 / K), floor)

the standard error of the difference of two means over K seeds, times Z = 3 (``Z_SCORE``). The
floor (``FLOORS``: 0.3 percentage points of accuracy, or 5 % of the mean squared error) keeps
the test meaningful when K is small and the sample standard deviations happen to be tiny.

The torch side uses ``torch_ref.data.MemoryLoader`` (tensors in memory, the same floats as
``ToTensor``), so seconds per epoch compare the training loops, not PIL decoding. jaxlight's
first epoch includes compilation, so "s/epoch" is the mean over later epochs (the first when
there is only one) and "first epoch s" is shown beside it; ``epoch_seconds`` lists them all.

Exit codes (``jaxlight.cli``'s): 0 the comparison ran and its files are written (whether or not
the frameworks agree: the table says); 2 a usage error (``--seeds 0``, ``--torch-threads 0``...)
or a bad ``--out``/``--data-dir``, found before any training; 3 a run of either framework
diverged (its loss became NaN or Inf; the message names the framework, seed and step); 1 a
failure while running (the files could not be written); 130/143 stopped by SIGINT/SIGTERM.

A ported pair (``jaxlight.port``: a torch module and its NNX port) compares the same way on
your data (:func:`ported_pair`; ``jaxlight compare --ported MODULE:CALLABLE --input SPEC --data
PATH``): each seed builds the torch module afresh under ``torch.manual_seed(seed)`` for the torch
side, and for the jaxlight side converts the module the same constructor draws under
``torch.manual_seed(seed + JAX_DRAW_OFFSET)``: the same initial distribution, an independent
draw, as for the built-ins. The batches are ``{"inputs": (x, ...), "target": y}``
(``jaxlight.bridge.porting.task``) unless your loss pair says otherwise; the metric is the test accuracy
when the loss reports ``accuracy``, else the test loss.

Example:
    $ jaxlight compare --model mlp --seeds 3 --epochs 2 --lr 0.001 --out runs/compare-mlp
    $ jaxlight compare --ported nets.py:Net --input "float32[8,1,28,28]" --data mydata.py:digits --seeds 3
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from jaxlight.recipes import RECIPES, Recipe

__all__ = ["RunResult", "Pair", "Z_SCORE", "FLOORS", "builtin_pair", "ported_pair", "run_jaxlight", "run_torch",
           "agreement_tolerance", "compare", "render_markdown", "render_table", "plot_curves", "compare_parser",
           "run_compare"]

Z_SCORE = 3.0
# accuracy: absolute (0.3 points); mse and loss: relative to the mean
FLOORS = {"accuracy": 0.003, "mse": 0.05, "loss": 0.05}
FRAMEWORKS = ("jaxlight", "torch")
JAX_DRAW_OFFSET = 1_000_003  # a ported pair's jaxlight side: torch's constructor under seed + this


@dataclass(frozen=True)
class Pair:
    """What the two frameworks train: a built-in model (:func:`builtin_pair`) or a ported pair
    (:func:`ported_pair`).

    Attributes:
        name: for the tables.
        jax_model: ``seed -> nnx.Module``, freshly initialised.
        torch_model: ``seed -> torch.nn.Module``, freshly initialised.
        loss_fn: the jaxlight side's loss (a built-in task or ``loss_fn(model, batch)``).
        torch_loss: the torch side's: a ``torch_ref.tasks.Task`` on ``(x, y)`` batches, or
            ``torch_loss_fn(model, batch)`` on the same batches as tensors.
        metric: the test metric compared: a key of ``jaxlight.loop.evaluate``'s result.
        label_dtype: the torch labels' dtype for a built-in task.
    """

    name: str
    jax_model: Any
    torch_model: Any
    loss_fn: Any
    torch_loss: Any
    metric: str
    label_dtype: Any = None


def builtin_pair(recipe: Recipe) -> Pair:
    """A built-in model: ``jaxlight.models`` and ``torch_ref.models`` by the recipe's name, its task."""
    import torch_ref.models
    import torch_ref.tasks

    from jaxlight.models import build_model
    from jaxlight.tasks import TASKS

    task = TASKS[recipe.task]()
    ttask = torch_ref.tasks.TASKS[recipe.task]()
    return Pair(recipe.model, lambda seed: build_model(recipe.model, seed),
                lambda seed: torch_ref.models.build_model(recipe.model, seed), task, ttask, task.metric,
                ttask.label_dtype)


def ported_pair(torch_factory, example_inputs, loss: tuple | None = None, name: str | None = None) -> Pair:
    """A torch model and its port (``jaxlight.port``), for :func:`compare` on your data.

    Args:
        torch_factory: ``() -> torch.nn.Module`` (a class, or a function), freshly initialised
            on every call; the pair seeds torch before each call.
        example_inputs: the tensors ``forward`` takes (traced once, to write the port).
        loss: ``(loss_fn, torch_loss_fn)`` in jaxlight's contract; default: the port's default
            for the model's outputs (``jaxlight.bridge.porting.task``: cross-entropy for a classifier,
            else the squared error), on ``{"inputs", "target"}`` batches.
        name: for the tables (default: the torch class name).
    """
    import torch

    from jaxlight.interop import model_from_torch
    from jaxlight.bridge.porting import port
    from torch_ref.interop import state_dict_to_numpy

    def torch_model(seed: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return torch_factory()

    first = torch_model(0)
    ported = port(first, example_inputs, loss=loss, check=False)
    template, layout = ported.model, ported.layout

    def jax_model(seed: int):
        return model_from_torch(state_dict_to_numpy(torch_model(seed + JAX_DRAW_OFFSET)), template, layout)

    jax_loss, torch_loss = ported.loss
    metric = "accuracy" if ported.loss_kind == "cross_entropy" else "loss"
    return Pair(name or type(first).__name__, jax_model, torch_model, jax_loss, torch_loss, metric)


@dataclass
class RunResult:
    """One training run.

    Attributes:
        framework: "jaxlight" or "torch".
        seed: the run's seed (weights and shuffle).
        metric: "accuracy" or "mse".
        final: the test metric after the last epoch.
        test_history: the test metric after each epoch.
        step_losses: the training loss of every step, in order.
        epoch_seconds: wall time of each training epoch (jaxlight's first includes compilation).
    """

    framework: str
    seed: int
    metric: str
    final: float
    test_history: list = field(default_factory=list)
    step_losses: list = field(default_factory=list)
    epoch_seconds: list = field(default_factory=list)


def run_jaxlight(recipe: Recipe, seed: int, train, test, pair: Pair | None = None) -> RunResult:
    """Train ``recipe`` with jaxlight from ``pair.jax_model(seed)`` (default: the recipe's
    built-in model, ``build_model(model, seed)``), data order from ``seed``."""
    from jaxlight.loop import evaluate, fit
    from jaxlight.optim import make_optimizer
    from jaxlight.state import create_train_state

    pair = pair or builtin_pair(recipe)
    tx = make_optimizer(recipe.optimizer, recipe.lr, **recipe.optimizer_kwargs())
    state = create_train_state(pair.jax_model(seed), tx, pair.loss_fn, seed)
    train_d, test_d = train.to_device(), test.to_device()
    result = RunResult("jaxlight", seed, pair.metric, float("nan"))
    for _ in range(recipe.epochs):
        # One epoch per fit: fit continues from state.step (the next epoch's order), and the
        # test accuracy is taken between epochs, outside the timed steps.
        state, (epoch,) = fit(state, train_d, 1, recipe.batch_size)
        result.epoch_seconds.append(epoch.seconds)
        losses = epoch.step_metrics["loss"]
        if not np.isfinite(losses).all():
            bad = int(np.argmax(~np.isfinite(losses)))
            raise FloatingPointError(f"jaxlight, seed {seed}: training diverged: the loss is {losses[bad]} at step "
                                     f"{len(result.step_losses) + bad + 1} (epoch {epoch.epoch + 1})")
        result.step_losses.extend(float(v) for v in losses)
        result.test_history.append(evaluate(state, test_d)[pair.metric])
    result.final = result.test_history[-1]
    return result


def run_torch(recipe: Recipe, seed: int, train, test, pair: Pair | None = None) -> RunResult:
    """Train ``recipe`` with torch_ref from ``pair.torch_model(seed)`` (default: the recipe's
    built-in model, ``build_model(model, seed)``), shuffled by a ``torch.Generator`` seeded
    with ``seed``."""
    import torch

    from torch_ref.data import MemoryLoader
    from torch_ref.loop import evaluate, train_epoch
    from torch_ref.optim import make_optimizer

    pair = pair or builtin_pair(recipe)
    task = pair.torch_loss
    torch.manual_seed(seed)
    model = pair.torch_model(seed)
    optimizer = make_optimizer(recipe.optimizer, model.parameters(), recipe.lr, **recipe.optimizer_kwargs())
    labels = {"label_dtype": pair.label_dtype} if pair.label_dtype is not None else {}
    loader = MemoryLoader(train, recipe.batch_size, True, torch.Generator().manual_seed(seed), **labels)
    test_loader = MemoryLoader(test, 1000, False, **labels)
    result = RunResult("torch", seed, pair.metric, float("nan"))
    for _ in range(recipe.epochs):
        losses: list = []
        t0 = time.perf_counter()
        try:
            train_epoch(model, optimizer, loader, task, on_step=lambda m: losses.append(m["loss"]))
        except FloatingPointError as exc:  # (torch_ref.loop.NonFiniteLossError)
            raise FloatingPointError(f"torch, seed {seed}: training diverged: {exc}") from None
        result.epoch_seconds.append(time.perf_counter() - t0)
        result.step_losses.extend(losses)
        result.test_history.append(evaluate(model, test_loader, task)[pair.metric])
    result.final = result.test_history[-1]
    return result


RUNNERS = {"jaxlight": run_jaxlight, "torch": run_torch}


def agreement_tolerance(a, b, metric: str = "accuracy", z: float = Z_SCORE) -> float:
    """How far apart two frameworks' mean final metrics may be, from their seed-to-seed spread.

    Args:
        a, b: the final metrics of each framework, one per seed (K >= 2 each for a spread).
        metric: picks the floor (``FLOORS``).
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    se = math.sqrt((a.var(ddof=1) if a.size > 1 else 0.0) / a.size + (b.var(ddof=1) if b.size > 1 else 0.0) / b.size)
    floor = FLOORS[metric] * (abs(float(np.mean(np.concatenate([a, b])))) if metric != "accuracy" else 1.0)
    return max(z * se, floor)


def _summary(runs: list[RunResult]) -> dict:
    finals = [r.final for r in runs]
    return {
        "metric": runs[0].metric,
        "mean": float(np.mean(finals)),
        "std": float(np.std(finals, ddof=1)) if len(finals) > 1 else 0.0,
        "values": finals,
        # jaxlight's first epoch compiles; later epochs are the steady state. With one epoch
        # there is only the first.
        "seconds_per_epoch": float(np.mean([s for r in runs for s in (r.epoch_seconds[1:] or r.epoch_seconds)])),
        "first_epoch_seconds": float(np.mean([r.epoch_seconds[0] for r in runs])),
        "epoch_seconds": [r.epoch_seconds for r in runs],
        "test_history": [r.test_history for r in runs],
        "step_losses": [r.step_losses for r in runs],
    }


def compare(recipe: Recipe, seeds: list[int], data_dir=None, log=print, torch_threads: int | None = None,
            pair: Pair | None = None, data=None) -> dict:
    """Train both frameworks for every seed; the ``compare.json`` payload.

    Runs alternate between frameworks seed by seed, so that machine load drifting during the
    comparison affects both alike.

    Args:
        pair: what the frameworks train (default: the recipe's built-in models and task).
        data: ``seed -> (train, test)`` ``ArrayDataset`` s (default: the recipe's dataset).
        torch_threads: ``torch.set_num_threads`` for the torch runs (restored afterwards);
            None keeps torch's default. On a busy machine PyTorch's OpenMP threads spin against
            other processes (measured on a shared 2-core box: 130-500 ms per MLP step with 2
            threads, 22 ms with 1), so one thread is the fairer setting there.
    """
    import torch

    from jaxlight import report
    from jaxlight.data import load_task_data

    runs: dict[str, list[RunResult]] = {f: [] for f in FRAMEWORKS}
    previous = torch.get_num_threads()
    if torch_threads:
        torch.set_num_threads(torch_threads)
    try:
        for seed in seeds:
            train, test = data(seed) if data is not None else load_task_data(recipe.dataset, data_dir, seed)[:2]
            for framework in FRAMEWORKS:
                result = RUNNERS[framework](recipe, seed, train, test, pair)
                runs[framework].append(result)
                log(f"{framework:<8} seed {seed}: test {result.metric} {result.final:.4f}, "
                    f"{np.mean(result.epoch_seconds):.2f} s/epoch")
        threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)
    summaries = {f: _summary(runs[f]) for f in FRAMEWORKS}
    metric = summaries["jaxlight"]["metric"]
    tol = agreement_tolerance(summaries["jaxlight"]["values"], summaries["torch"]["values"], metric)
    diff = summaries["jaxlight"]["mean"] - summaries["torch"]["mean"]
    return {
        "model": recipe.model,
        "recipe": asdict(recipe),
        "seeds": list(seeds),
        "metric": metric,
        "frameworks": summaries,
        "difference": diff,
        "tolerance": tol,
        "tolerance_rule": f"max({Z_SCORE:g} * sqrt(std_jax^2/K + std_torch^2/K), "
                          + (f"{100 * FLOORS[metric]:g} accuracy points)" if metric == "accuracy"
                             else f"{FLOORS[metric]:g} * mean {metric})"),
        "agree": bool(abs(diff) <= tol),
        "versions": report.library_versions("jax", "jaxlib", "flax", "optax", "torch", "numpy"),
        "torch_threads": threads,
        "backend": _jax_backend(),
    }


def _jax_backend() -> str:
    import jax

    return jax.default_backend()


def _fmt(metric: str, value: float) -> str:
    return f"{100 * value:.2f}" if metric == "accuracy" else f"{value:.4f}"


def render_table(payload: dict) -> str:
    """The side-by-side table as aligned text (what the command prints)."""
    metric = payload["metric"]
    unit = "test accuracy %" if metric == "accuracy" else f"test {metric}"
    rows = [("framework", f"{unit} (mean ± std)", "s/epoch", "first epoch s")]
    for f in FRAMEWORKS:
        s = payload["frameworks"][f]
        rows.append((f, f"{_fmt(metric, s['mean'])} ± {_fmt(metric, s['std'])}", f"{s['seconds_per_epoch']:.2f}",
                     f"{s['first_epoch_seconds']:.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    r = payload["recipe"]
    lines.append(f"{payload['model']}: {r['optimizer']} lr {r['lr']}, batch {r['batch_size']}, {r['epochs']} epoch(s), "
                 f"seeds {payload['seeds']}, jax on {payload['backend']}, torch {payload['torch_threads']} thread(s)")
    lines.append(f"difference {_fmt(metric, payload['difference'])}, tolerance {_fmt(metric, payload['tolerance'])} "
                 f"({payload['tolerance_rule']}): {'AGREE' if payload['agree'] else 'DISAGREE'}")
    return "\n".join(lines)


def render_markdown(payload: dict) -> str:
    """``compare.md``: the same table in Markdown."""
    metric = payload["metric"]
    unit = "test accuracy (%)" if metric == "accuracy" else f"test {metric}"
    r = payload["recipe"]
    lines = [f"## {payload['model']}: jaxlight vs torch", "",
             f"{r['optimizer']} lr {r['lr']}, batch {r['batch_size']}, {r['epochs']} epoch(s), "
             f"seeds {payload['seeds']}, each framework its own initialisation and shuffling; "
             f"jax on {payload['backend']}, torch {payload['torch_threads']} thread(s).", "",
             f"| framework | {unit}, mean ± std | s/epoch | first epoch s |", "| --- | --- | --- | --- |"]
    for f in FRAMEWORKS:
        s = payload["frameworks"][f]
        lines.append(f"| {f} | {_fmt(metric, s['mean'])} ± {_fmt(metric, s['std'])} | {s['seconds_per_epoch']:.2f} "
                     f"| {s['first_epoch_seconds']:.2f} |")
    lines += ["", f"Difference {_fmt(metric, payload['difference'])}, tolerance {_fmt(metric, payload['tolerance'])} "
              f"= {payload['tolerance_rule']}: **{'agree' if payload['agree'] else 'disagree'}**.", ""]
    return "\n".join(lines)


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    window = max(1, min(window, len(values)))
    kernel = np.ones(window) / window
    return np.convolve(values, kernel, mode="valid")


def plot_curves(payload: dict, path: str | Path) -> Path:
    """A PNG: training loss per step (mean over seeds, smoothed) and the test metric per epoch,
    one line per framework."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_test) = plt.subplots(1, 2, figsize=(11, 4))
    for f, color in zip(FRAMEWORKS, ("tab:blue", "tab:orange")):
        s = payload["frameworks"][f]
        steps = min(len(v) for v in s["step_losses"])
        losses = np.mean([v[:steps] for v in s["step_losses"]], axis=0)
        window = max(1, steps // 50)
        smooth = _smooth(losses, window)
        ax_loss.plot(np.arange(len(smooth)) + window, smooth, color=color, label=f)
        hist = np.asarray(s["test_history"], np.float64)
        epochs = np.arange(1, hist.shape[1] + 1)
        ax_test.errorbar(epochs, hist.mean(0), yerr=hist.std(0, ddof=1) if len(hist) > 1 else None,
                         color=color, marker="o", capsize=3, label=f)
    ax_loss.set(xlabel="step", ylabel="training loss (mean over seeds, smoothed)", yscale="log")
    ax_test.set(xlabel="epoch", ylabel=f"test {payload['metric']} (mean ± std over seeds)")
    ax_test.xaxis.get_major_locator().set_params(integer=True)
    r = payload["recipe"]
    fig.suptitle(f"{payload['model']}: {r['optimizer']} lr {r['lr']}, batch {r['batch_size']}, "
                 f"{len(payload['seeds'])} seeds")
    for ax in (ax_loss, ax_test):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def compare_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The ``compare`` subcommand: ``train``'s flags plus ``--seeds``."""
    from jaxlight.optim import OPTIMIZERS

    p = sub.add_parser("compare", help="train jaxlight and torch_ref over several seeds; compare accuracy and speed",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=sorted(RECIPES), default="mlp")
    p.add_argument("--seeds", type=int, default=3, help="seeds per framework: --seed, --seed + 1, ...")
    p.add_argument("--epochs", type=int, help="default: the model's recipe (jaxlight.recipes)")
    p.add_argument("--batch-size", type=int, help="default: the model's recipe")
    p.add_argument("--lr", type=float, help="default: the model's recipe")
    p.add_argument("--optimizer", choices=sorted(OPTIMIZERS), help="default: the model's recipe")
    p.add_argument("--seed", type=int, default=0, help="the first seed")
    p.add_argument("--data-dir", help="a folder holding MNIST/raw/ (default: $JAXLIGHT_DATA, then the cache)")
    p.add_argument("--out", help="output folder (default: runs/compare-<model>)")
    p.add_argument("--torch-threads", type=int, help="torch.set_num_threads for the torch runs (default: torch's)")
    g = p.add_argument_group("a ported pair (jaxlight port) instead of --model")
    g.add_argument("--ported", metavar="MODULE:CALLABLE",
                   help="a torch model (class or function; as for jaxlight port), trained against its port")
    g.add_argument("--init-args", default="{}", help="JSON keyword arguments for CALLABLE")
    g.add_argument("--input", action="append", default=[], metavar="DTYPE[D0,D1,...]",
                   help="example inputs to trace forward with (as for jaxlight port)")
    g.add_argument("--data", metavar="MODULE:FUNCTION",
                   help="your data function: returns train, val, test (or train, test) ArrayDatasets of "
                        "{inputs: (x, ...), target: y} batches; its test set (else val) is evaluated")
    g.add_argument("--data-args", default="{}", help="JSON keyword arguments for the data function")
    return p


def _ported_from_args(args: argparse.Namespace):
    """``(pair, data, recipe)`` for ``--ported``; raises ``UsageError`` naming the flag."""
    import json

    import torch

    from jaxlight.commands import UsageError
    from jaxlight.data import ArrayDataset
    from jaxlight.bridge.porting.cli import _build, load_callable, parse_input

    if not args.data:
        raise UsageError("--ported needs --data MODULE:FUNCTION (your data function: train, val, test)")
    if not args.input:
        raise UsageError("--ported needs one --input per positional argument of forward, e.g. 'float32[8,1,28,28]'")
    first = _build(args.ported, args.init_args)
    init_args = json.loads(args.init_args)
    factory = load_callable(args.ported)
    inputs = tuple(parse_input(spec, first, torch.Generator().manual_seed(0)) for spec in args.input)
    try:
        data_args = json.loads(args.data_args)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--data-args: not JSON ({exc})") from None
    data_fn = load_callable(args.data)
    try:
        out = data_fn(**data_args)
    except Exception as exc:  # noqa: BLE001 - the user's data function failed: one line
        raise UsageError(f"--data {args.data}: raised {type(exc).__name__}: {exc}") from None
    parts = tuple(out) if isinstance(out, (tuple, list)) else (out,)
    train, test = parts[0], next((p for p in reversed(parts[1:]) if p is not None), None)
    if not isinstance(train, ArrayDataset) or not isinstance(test, ArrayDataset):
        raise UsageError(f"--data {args.data}: expected (train, val, test) or (train, test) ArrayDatasets with a test "
                         f"or validation set, got {type(out).__name__}")
    pair = ported_pair(lambda: factory(**init_args), inputs)
    from jaxlight.recipes import Recipe

    recipe = Recipe(pair.name, "port", args.data, args.optimizer or "adam", args.lr or 1e-3, args.batch_size or 64,
                    args.epochs or 1, seed=args.seed)
    return pair, (lambda seed: (train, test)), recipe


def run_compare(args: argparse.Namespace) -> dict:
    """Run the comparison for parsed ``compare`` flags; print the table, write the files."""
    from jaxlight import report
    from jaxlight.commands import UsageError, prepare_output_dir, recipe_from_args

    if args.seeds < 1:
        raise UsageError(f"--seeds must be >= 1, got {args.seeds}")
    if args.torch_threads is not None and args.torch_threads < 1:
        raise UsageError(f"--torch-threads must be >= 1, got {args.torch_threads}")
    recipe = recipe_from_args(args)  # (checks the flags; replaced below for --ported)
    pair = data = None
    if args.ported:
        pair, data, recipe = _ported_from_args(args)
    out = prepare_output_dir(args.out or f"runs/compare-{recipe.model}", "--out")  # (before any training)
    seeds = list(range(args.seed, args.seed + args.seeds))
    print(f"compare: {recipe.model} on {recipe.dataset}, {recipe.optimizer} lr {recipe.lr}, batch "
          f"{recipe.batch_size}, {recipe.epochs} epoch(s), seeds {seeds}", flush=True)
    payload = compare(recipe, seeds, args.data_dir, log=lambda line: print(line, flush=True),
                      torch_threads=args.torch_threads, pair=pair, data=data)
    print(render_table(payload))
    print(f"wrote {report.write_json(out / 'compare.json', payload)}")
    report.write_text_atomic(out / "compare.md", render_markdown(payload))
    print(f"wrote {out / 'compare.md'}")
    print(f"wrote {plot_curves(payload, out / 'compare.png')}")
    return payload
