"""One command for the whole suite: ``python -m benchmarks.run [--quick|--tiny] [--out DIR]``.

For each model and batch size, every variant (``benchmarks.variants``) is built and warmed up
(compilation timed), then timed ``--repeats`` times in an interleaved order (A B C ... C B A
...), so that drift in the machine's load hits every variant alike. jaxlight's variants are
timed in whole epochs of what users run (``loop.fit``, ``Trainer.fit``), the first epoch
(compilation) apart; the torch variants in windows of synchronised steps. Reported: medians,
samples/s, seconds per epoch (jaxlight: the median epoch; torch: the median step time x steps
per epoch), the ratio to ``jaxlight`` fused, the fraction of the matmul peak measured in the
same run, and the process's peak resident memory growth while the variant warmed up. Then time
to a target test accuracy for the variants named in the mode's settings.

Writes ``results.json`` (hardware, versions, settings, every timing), ``results.md`` and
``throughput.png`` / ``time_to_accuracy.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import os
import statistics
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from jaxlight.recipes import recipe_for

__all__ = ["Settings", "MODES", "main", "run"]


@dataclass(frozen=True)
class Settings:
    """What a run measures. ``window_samples`` sets each timed window to about that many
    examples (at least ``min_window`` steps, at most one epoch), so large batches are not timed
    for minutes. ``tta`` lists ``(model, target, max_epochs, variants)``."""

    mode: str
    models: tuple = ("mlp", "cnn", "lstm")
    batch_sizes: tuple = (64, 256, 1024)
    variants: tuple = ("jax_fused", "jax_step", "jax_trainer", "torch_dataloader", "torch_memory",
                       "torch_compile", "lightning")
    repeats: int = 3
    warmup_steps: int = 3
    window_samples: int = 3200
    min_window: int = 3
    min_window_s: float = 1.0
    train_subset: int | None = None   # train on the first N examples only (tiny mode)
    peak_n: int = 2048
    tta: tuple = ()
    tta_batch_size: int = 64
    tta_evals_per_epoch: int = 4
    tta_max_seconds: float | None = None
    seed: int = 0
    tta_seeds: tuple = (0,)           # time to accuracy: one fresh run per seed, mean ± std
    throughput: bool = True           # False: time to accuracy only
    allow_busy: bool = False          # run on a busy machine anyway (tables marked BUSY MACHINE)
    torch_threads: int | None = None  # None: torch's default (one per core)
    # Ported models (--ported): (group name, MODULE:CALLABLE, init args JSON, per-example input
    # shape). Their groups run the same variants: torch on the module, jaxlight on its port.
    ported: tuple = ()
    # The recipes' learning rates (jaxlight.recipes: mlp 1e-2, cnn 1e-3, lstm 2e-3), Adam.
    lr: dict = field(default_factory=lambda: {m: recipe_for(m).lr for m in ("mlp", "cnn", "lstm")})


ALL_TORCH_JAX = ("jax_fused", "jax_step", "torch_dataloader", "torch_memory")
MODES = {
    # Sized for a 2-core CPU: windows of ~1600 samples and at least 1 s, and time to accuracy
    # over 3 seeds capped at 150 s of training per run (then "not reached").
    "full": Settings("full", window_samples=1600, tta_max_seconds=150.0, tta_seeds=(0, 1, 2),
                     tta=(("mlp", 0.97, 3, ALL_TORCH_JAX + ("lightning",)),
                          ("cnn", 0.99, 5, ("jax_fused", "torch_memory", "lightning")))),
    "quick": Settings("quick", batch_sizes=(64,), repeats=2, window_samples=1280, peak_n=1024, min_window_s=0.3,
                      tta=(("mlp", 0.97, 1, ("jax_fused", "torch_memory")),)),
    # The smoke test: every variant but torch.compile, whose 30-70 s compilation here would
    # dominate it (quick mode covers it).
    "tiny": Settings("tiny", models=("mlp",), batch_sizes=(64,), repeats=1, warmup_steps=1, window_samples=128,
                     variants=("jax_fused", "jax_step", "jax_trainer", "torch_dataloader", "torch_memory", "lightning"),
                     min_window=2, min_window_s=0.0, train_subset=2048, peak_n=256, tta_evals_per_epoch=2,
                     tta=(("mlp", 0.5, 1, ("jax_fused", "torch_memory")),)),
}


BUSY_PER_CORE = 0.5  # a 1-minute load average above this many runnable tasks per core is busy
# During a run the benchmark itself keeps every core busy (a load of about one per core), so
# only load beyond that is somebody else's.
BUSY_MARK = "BUSY MACHINE: ratios unreliable"


class BusyMachine(RuntimeError):
    """The machine is too loaded for timings to mean anything; the message says how loaded."""


def loadavg() -> tuple[float, float, float]:
    """``os.getloadavg()``: (1, 5, 15)-minute load averages (a seam for tests)."""
    return os.getloadavg()


def check_load(allow_busy: bool, cores: int | None = None, load: tuple | None = None) -> dict:
    """Refuse to benchmark a busy machine: raises :class:`BusyMachine` when the 1-minute load
    average exceeds ``BUSY_PER_CORE`` per core, unless ``allow_busy``. Returns ``{"load",
    "cores", "threshold", "busy"}`` for the results, whose tables are then marked."""
    cores = cores or os.cpu_count() or 1
    load = tuple(load if load is not None else loadavg())
    threshold = BUSY_PER_CORE * cores
    busy = load[0] > threshold
    if busy and not allow_busy:
        raise BusyMachine(f"1-minute load average {load[0]:.2f} > {threshold:.2f} ({BUSY_PER_CORE} x {cores} cores): "
                          f"other jobs would distort every timing. Wait for a quiet machine, or pass --allow-busy "
                          f"to run anyway (every table is then marked '{BUSY_MARK}').")
    return {"load": list(load), "cores": cores, "threshold": threshold, "busy": busy}


class PeakRSS:
    """Samples the process's resident memory in a thread; ``peak - start`` approximates the memory
    a variant allocated (CPU: JAX, XLA and torch all allocate in this process). Allocators keep
    freed memory, so a later variant can reuse what an earlier one left: an approximation."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self.start = self._rss()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _loop(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.interval)

    def __enter__(self):
        self.peak = self.start = self._rss()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def mb(self) -> float:
        return (self.peak - self.start) / 2 ** 20


def _load_data(data_dir, subset):
    import numpy as np

    from jaxlight.data import load_mnist

    train, test = load_mnist(data_dir, download=False)
    tx, ty = train.images, train.labels.astype(np.int32)
    if subset:
        tx, ty = tx[:subset], ty[:subset]
    return tx, ty, test.images, test.labels.astype(np.int32)


def _jax_device_stats():
    import jax

    device = jax.devices()[0]
    return device.memory_stats() if device.platform != "cpu" and hasattr(device, "memory_stats") else None


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _measure_group(settings: Settings, model: str, batch_size: int, data, data_dir, flops: float,
                   peak: float) -> list[dict]:
    """All variants of one (model, batch size), interleaved. Each row records the load average
    before its variant was built, after each of its timed windows, and after its last one."""
    import torch

    from benchmarks.variants import Context, Skip, make

    ctx = _context(settings, model, batch_size, data, data_dir, settings.seed)
    window = max(settings.min_window, min(ctx.num_batches, settings.window_samples // batch_size))
    rows, live, times = {}, {}, {}
    for name in settings.variants:
        row = rows[name] = {"model": model, "batch_size": batch_size, "variant": name, "window_steps": window,
                            "status": "ok", "reason": "", "load_before": list(loadavg()), "load_during": []}
        try:
            cuda = torch.cuda.is_available() and name.startswith(("torch", "lightning"))
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                variant = make(name, ctx)
                row["build_s"] = time.perf_counter() - t0
                if hasattr(variant, "run_epoch"):
                    # Whole epochs as users run them: the first one (compilation) apart, then
                    # one steady epoch per repeat below.
                    row["warmup_s"] = row["first_epoch_s"] = variant.run_epoch()
                    row.update(window_steps=ctx.num_batches, warmup_steps=ctx.num_batches, timed_steps=ctx.num_batches,
                               timing="whole epochs")
                    live[name], times[name] = variant, []
                else:
                    # Compilation and warm-up: the first steps (one window for the fused
                    # variant, which compiles the K it will be timed with).
                    row["warmup_steps"] = window if name == "jax_fused" else settings.warmup_steps
                    row["warmup_s"] = variant.run(row["warmup_steps"])
                    settle_s = variant.run(window)  # settles caches, allocators, thread pools
                    # Windows shorter than min_window_s are mostly scheduler noise on a loaded
                    # machine: time a whole multiple of the compiled window instead.
                    row["timed_steps"] = window * max(1, math.ceil(settings.min_window_s / max(settle_s, 1e-9)))
                    row["timing"] = "windows of steps"
                    live[name], times[name] = variant, []
            row["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else mem.mb
            row["peak_mem_kind"] = "torch.cuda.max_memory_allocated" if cuda else "process RSS growth during warm-up"
            jax_stats = _jax_device_stats() if name.startswith("jax") else None
            if jax_stats and "peak_bytes_in_use" in jax_stats:  # accelerators report it; CPU does not
                row["peak_mem_mb"] = jax_stats["peak_bytes_in_use"] / 2 ** 20
                row["peak_mem_kind"] = "jax peak_bytes_in_use (high-water of the whole process so far)"
        except Skip as exc:
            row.update(status="skipped", reason=str(exc))
        except Exception as exc:  # a broken variant is reported, not fatal to the suite
            row.update(status="error", reason=f"{type(exc).__name__}: {exc}")
            traceback.print_exc()
        _log(f"{model} B={batch_size} {name}: {row['status']} {row.get('warmup_s', 0):.1f}s warm-up {row['reason'][:100]}")
    for rep in range(settings.repeats):
        order = list(live) if rep % 2 == 0 else list(reversed(live))  # A B C, C B A: no position bias
        for name in order:
            row = rows[name]
            try:
                variant = live[name]
                seconds = variant.run_epoch() if hasattr(variant, "run_epoch") else variant.run(row["timed_steps"])
                times[name].append(seconds / row["timed_steps"])
            except Exception as exc:
                row.update(status="error", reason=f"{type(exc).__name__}: {exc}")
                traceback.print_exc()
            row["load_during"].append(list(loadavg()))
            row["load_after"] = list(loadavg())
    for name, row in rows.items():
        if row["status"] != "ok" or not times.get(name):
            continue
        step_s = statistics.median(times[name])
        row.update(step_seconds=times[name], step_s=step_s, samples_per_s=batch_size / step_s,
                   s_per_epoch=step_s * ctx.num_batches,
                   fraction_of_peak=None if flops is None else flops / step_s / peak,
                   # What the first call cost beyond the steady steps it ran: compilation,
                   # mostly (plus first-touch allocation and thread-pool start-up).
                   compile_s=max(0.0, row["warmup_s"] - row["warmup_steps"] * step_s))
    fused = rows.get("jax_fused") if "samples_per_s" in rows.get("jax_fused", {}) else None
    for row in rows.values():
        if fused and "samples_per_s" in row:
            row["ratio_to_fused"] = row["samples_per_s"] / fused["samples_per_s"]
    live.clear()
    gc.collect()
    return list(rows.values())


def _context(settings: Settings, model: str, batch_size: int, data, data_dir, seed: int):
    """The variants' Context for a group: a built-in model, or a ported one (its torch module
    built from ``--ported``, the images reshaped to its per-example input shape)."""
    from benchmarks.variants import Context

    spec = next((p for p in settings.ported if p[0] == model), None)
    lr = settings.lr.get(model, 1e-3)
    if spec is None:
        return Context(model, batch_size, lr, *data, data_dir=data_dir, seed=seed)
    _, target, init_args, shape = spec
    train_x, train_y, test_x, test_y = data
    factory = ported_factory(target, init_args)
    return Context(model, batch_size, lr, train_x.reshape((-1, *shape)), train_y, test_x.reshape((-1, *shape)),
                   test_y, data_dir=data_dir, seed=seed, torch_factory=factory)


def ported_factory(target: str, init_args: str):
    """``seed -> torch module`` for ``--ported MODULE:CALLABLE`` (``jaxlight port``'s loading)."""
    import json

    import torch

    from jaxlight.bridge.porting.cli import load_callable

    fn, kwargs = load_callable(target), json.loads(init_args)

    def build(seed: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return fn(**kwargs)

    return build


def _mark_if_busy(res: dict) -> None:
    """A run that started quiet but got busy is marked too: its tables say so, and
    ``busy_reason`` says when. During the run the benchmark's own threads load every core, so
    the threshold there is one task per core (its own) plus ``BUSY_PER_CORE`` per core."""
    cores = res["load_check"]["cores"]
    threshold = res["load_check"]["threshold"] + cores
    seen = [(f"{r['model']} {r['variant']}", l[0]) for r in res["results"] + res["tta"]
            for l in [r.get("load_before"), *r.get("load_during", []), r.get("load_after")] if l]
    seen += [("end", res["load_average_at_end"][0])] if res.get("load_average_at_end") else []
    worst = max(seen, key=lambda s: s[1], default=None)
    if res["load_check"]["busy"]:
        res["busy"], res["busy_reason"] = True, f"1-minute load {res['load_check']['load'][0]:.2f} at the start"
    elif worst and worst[1] > threshold:
        res["busy"], res["busy_reason"] = True, f"1-minute load {worst[1]:.2f} during {worst[0]}"


def run(settings: Settings, out: Path, data_dir: str | None) -> dict:
    import jax

    from benchmarks import flops as flops_mod
    from benchmarks import hardware, report
    from benchmarks.tta import time_to_accuracy
    from benchmarks.variants import Context, Skip

    import torch

    # Before anything else loads the machine: is it quiet enough to time? (raises BusyMachine)
    load = check_load(settings.allow_busy)
    torch_default_threads = torch.get_num_threads()
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    hw = hardware.describe()
    _log(f"hardware {hw}")
    data = _load_data(data_dir, settings.train_subset)
    peak = hardware.matmul_peak(settings.peak_n)
    _log(f"matmul peak {peak['peak_flops'] / 1e9:.1f} GFLOP/s")
    res = {"hardware": hw, "versions": hardware.versions(), "peak": peak,
           "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(settings).items()},
           "command": " ".join(sys.argv), "torch_threads": torch.get_num_threads(),
           "torch_threads_source": "--torch-threads" if settings.torch_threads else "torch's default",
           "torch_default_threads": torch_default_threads, "load_check": load, "busy": load["busy"],
           "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "flops": {}, "results": [], "tta": []}
    groups = tuple(settings.models) + tuple(p[0] for p in settings.ported)
    for model in groups if settings.throughput else ():
        builtin = model in settings.models
        if builtin:  # (a ported model's FLOPs are not counted: its row has no fraction of peak)
            res["flops"][model] = {b: {"xla": flops_mod.step_flops(model, b),
                                       "analytic": flops_mod.analytic_flops(model, b)} for b in settings.batch_sizes}
        for b in settings.batch_sizes:
            flops = res["flops"][model][b]["analytic"] if builtin else None
            res["results"] += _measure_group(settings, model, b, data, data_dir, flops, peak["peak_flops"])
            _mark_if_busy(res)
            report.write_all(res, out)  # partial results survive an interrupted run
    # Seed-major (seed 0: A B C, seed 1: A B C, ...): drift in the load hits every variant alike.
    for model, target, max_epochs, names in settings.tta:
        for seed, name in ((seed, name) for seed in settings.tta_seeds for name in names):
            ctx = _context(settings, model, settings.tta_batch_size, data, data_dir, seed)
            load_before = list(loadavg())
            try:
                t = time_to_accuracy(name, ctx, target, max_epochs, settings.tta_evals_per_epoch, settings.tta_max_seconds)
                t["status"] = "ok"
            except Skip as exc:
                t = {"variant": name, "model": model, "batch_size": ctx.batch_size, "target": target,
                     "status": "skipped", "reason": str(exc)}
            except Exception as exc:
                t = {"variant": name, "model": model, "batch_size": ctx.batch_size, "target": target,
                     "status": "error", "reason": f"{type(exc).__name__}: {exc}"}
                traceback.print_exc()
            t.update(seed=seed, load_before=load_before, load_after=list(loadavg()))
            res["tta"].append(t)
            _mark_if_busy(res)
            _log(f"time to {target} {model} {name} seed {seed}: {t.get('seconds')} ({t['status']})")
            report.write_all(res, out)
    res["load_average_at_end"] = list(loadavg())
    _mark_if_busy(res)
    end_peak = hardware.matmul_peak(settings.peak_n)
    res["peak_at_end"] = end_peak
    if end_peak["peak_flops"] > peak["peak_flops"]:  # the less loaded snapshot is the ceiling
        res["peak"] = end_peak
        for row in res["results"]:
            if row.get("fraction_of_peak") is not None:
                row["fraction_of_peak"] *= peak["peak_flops"] / end_peak["peak_flops"]
    res["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    report.write_all(res, out)
    return res


def _ported_settings(parser, args) -> tuple:
    """``Settings.ported`` from ``--ported``; a module that cannot be loaded is refused now."""
    import json

    try:
        shape = tuple(int(d) for d in args.ported_input.split(","))
    except ValueError:
        parser.error(f"--ported-input: cannot read {args.ported_input!r}; expected e.g. 1,28,28")
    if math.prod(shape) != 28 * 28:
        parser.error(f"--ported-input {args.ported_input}: the MNIST images have 784 values, not {shape}")
    try:
        json.loads(args.ported_init_args)
    except json.JSONDecodeError as exc:
        parser.error(f"--ported-init-args: not JSON ({exc})")
    from jaxlight.commands import UsageError
    from jaxlight.bridge.porting.cli import load_callable

    out = []
    for target in args.ported:
        try:
            fn = load_callable(target)
        except UsageError as exc:
            parser.error(f"--ported {exc}")
        out.append((f"ported:{getattr(fn, '__name__', target)}", target, args.ported_init_args, shape))
    return tuple(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_const", dest="mode", const="quick", help="batch 64 only, 2 repeats: a few minutes")
    mode.add_argument("--tiny", action="store_const", dest="mode", const="tiny", help="smoke test: mlp, a 2048-example subset")
    parser.add_argument("--out", default=None, help="output folder (default: benchmarks/results/<hardware>)")
    parser.add_argument("--data-dir", default=None, help="folder holding MNIST/raw (default: jaxlight's search path)")
    parser.add_argument("--models", default=None, help="comma-separated subset of mlp,cnn,lstm")
    parser.add_argument("--batch-sizes", default=None, help="comma-separated, e.g. 64,256,1024")
    parser.add_argument("--variants", default=None, help="comma-separated subset of the variants")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--window-samples", type=int, default=None)
    parser.add_argument("--no-tta", action="store_true", help="skip time to accuracy")
    parser.add_argument("--tta", default=None, help="model:target:max_epochs:variant+variant;... overrides the mode's")
    parser.add_argument("--tta-batch-size", type=int, default=None)
    parser.add_argument("--tta-evals-per-epoch", type=int, default=None)
    parser.add_argument("--tta-max-seconds", type=float, default=None,
                        help="cap on one time-to-accuracy run's training seconds (0: no cap; full mode: 150)")
    parser.add_argument("--lr", default=None, help="learning rates instead of the recipes', e.g. mlp=0.001,cnn=0.002")
    parser.add_argument("--seeds", default=None, help="time to accuracy over these seeds, e.g. 0,1,2 (mean ± std)")
    parser.add_argument("--tta-only", action="store_true", help="skip the throughput tables: time to accuracy only")
    parser.add_argument("--allow-busy", action="store_true",
                        help=f"run although the 1-minute load average exceeds {BUSY_PER_CORE} per core; "
                             f"every table is then marked '{BUSY_MARK}'")
    parser.add_argument("--ported", action="append", default=[], metavar="MODULE:CALLABLE",
                        help="also time a torch model (class or function, as for jaxlight port; it takes MNIST "
                             "images) against its port: a group 'ported:<name>' with the same variants, torch on "
                             "the module, jaxlight on its port")
    parser.add_argument("--ported-init-args", default="{}", help="JSON keyword arguments for --ported's CALLABLE")
    parser.add_argument("--ported-input", default="28,28",
                        help="the per-example input shape --ported's module takes, e.g. 1,28,28 (default 28,28)")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's own); on a shared, oversubscribed CPU "
                             "torch's OpenMP barriers stall, and 1 thread is faster")
    args = parser.parse_args(argv)

    from benchmarks.variants import VARIANTS

    settings = MODES[args.mode or "full"]
    overrides = {}
    if args.models:
        overrides["models"] = tuple(args.models.split(","))
        bad = set(overrides["models"]) - {"mlp", "cnn", "lstm"}
        if bad:
            parser.error(f"--models: unknown {sorted(bad)}; choose from mlp, cnn, lstm")
    if args.batch_sizes:
        overrides["batch_sizes"] = tuple(int(b) for b in args.batch_sizes.split(","))
    if args.variants:
        overrides["variants"] = tuple(args.variants.split(","))
        bad = set(overrides["variants"]) - set(VARIANTS)
        if bad:
            parser.error(f"--variants: unknown {sorted(bad)}; choose from {', '.join(VARIANTS)}")
    if args.seeds:
        try:
            overrides["tta_seeds"] = tuple(int(v) for v in args.seeds.split(","))
        except ValueError:
            parser.error(f"--seeds: cannot read {args.seeds!r}; expected e.g. 0,1,2")
    if args.tta_only:
        overrides["throughput"] = False
    if args.tta_max_seconds is not None:
        if args.tta_max_seconds < 0:
            parser.error("--tta-max-seconds: must be >= 0 (0: no cap)")
        overrides["tta_max_seconds"] = args.tta_max_seconds or None
    if args.allow_busy:
        overrides["allow_busy"] = True
    for key in ("repeats", "window_samples", "tta_batch_size", "tta_evals_per_epoch", "torch_threads"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    if args.tta:
        specs = []
        for spec in args.tta.split(";"):
            try:
                model, target, epochs, names = spec.split(":")
                specs.append((model, float(target), float(epochs), tuple(names.split("+"))))
            except ValueError:
                parser.error(f"--tta: cannot read {spec!r}; expected model:target:max_epochs:variant+variant")
        overrides["tta"] = tuple(specs)
    if args.lr:
        try:
            lr = {m: float(v) for m, v in (item.split("=") for item in args.lr.split(","))}
        except ValueError:
            parser.error(f"--lr: cannot read {args.lr!r}; expected model=value,model=value")
        overrides["lr"] = {**settings.lr, **lr}
    if args.no_tta:
        overrides["tta"] = ()
    if args.ported:
        overrides["ported"] = _ported_settings(parser, args)
    settings = dataclasses.replace(settings, **overrides)

    from benchmarks import hardware

    out = Path(args.out) if args.out else Path(__file__).parent / "results" / hardware.hardware_slug(hardware.describe())
    try:
        res = run(settings, out, args.data_dir)
    except BusyMachine as exc:
        print(f"refusing to benchmark: {exc}", file=sys.stderr)
        return 3
    from benchmarks.report import markdown

    print(markdown(res))
    _log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
