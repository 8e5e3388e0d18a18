"""A/B two jaxlight checkouts: fused epochs of each through its own ``loop.fit``, interleaved.

    python -m benchmarks.ab --base main                       # main against this working tree
    python -m benchmarks.ab --base main --head HEAD~3 --models mlp --epochs 7 --out ab.json

``--base`` and ``--head`` are each a folder holding a checkout, or a git revision of this
repository, exported with ``git archive`` to a temporary folder (``--head`` defaults to this
working tree, uncommitted changes included). Both versions are importable only separately, so
each runs in its own worker process (``PYTHONPATH`` = its folder; the worker says which
``jaxlight`` it imported), holding MNIST on its device and one state per model.

Per model, each worker builds the model (same seed, Adam at the current recipe's learning rate,
batch ``--batch-size``) and trains its first epoch (compilation, reported apart); then
``--epochs`` steady epochs each, interleaved A B B A A B ... so that drift in the machine's load
hits both alike. An epoch is one ``loop.fit(state, data, epochs=1, batch_size=B)`` on an
``ArrayDataset`` on the device (the library's default K: the fused epoch), timed by its
``EpochResult.seconds``. Printed and written (``--out``): the median and minimum epoch of each,
the ratio head/base of the medians (above 1: head is slower), every epoch with the load average
after it, the CPU model and the load before and after. Run it on a quiet machine: nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["main"]

ROOT = Path(__file__).resolve().parents[1]


# -- the worker: runs in the checkout under test, imports only that checkout's jaxlight ----------

def _worker(data_dir: str | None, batch_size: int, subset: int | None) -> None:
    """Answer one JSON command per stdin line with one JSON line: ``{"cmd": "first", "model",
    "lr"}`` builds the model and trains its first epoch; ``{"cmd": "epoch", "model"}`` one more."""
    import jax
    import jaxlight
    from jaxlight import ArrayDataset, build_model, create_train_state, load_mnist, loop, make_optimizer, tasks

    train, _ = load_mnist(data_dir, download=False)
    x, y = train.images, train.labels.astype("int32")
    if subset:
        x, y = x[:subset], y[:subset]
    data = ArrayDataset(x, y).to_device()
    states = {}
    print(json.dumps({"jaxlight": os.path.dirname(jaxlight.__file__), "jax": jax.__version__,
                      "backend": jax.default_backend()}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "quit":
            break
        model = cmd["model"]
        if cmd["cmd"] == "first":
            states[model] = create_train_state(build_model(model, 0), make_optimizer("adam", cmd["lr"]),
                                               tasks.multiclass(), seed=0)
        t0 = time.perf_counter()
        states[model], history = loop.fit(states[model], data, epochs=1, batch_size=batch_size)
        wall = time.perf_counter() - t0
        print(json.dumps({"seconds": history[-1].seconds, "fit_s": wall, "loss": history[-1].metrics["loss"],
                          "step": int(states[model].step), "load": list(os.getloadavg())}), flush=True)


# -- the controller ------------------------------------------------------------------------------

class Worker:
    """One checkout's worker process; ``ask(cmd)`` sends a command and returns its answer."""

    def __init__(self, label: str, folder: Path, args):
        self.label, self.folder = label, folder
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--batch-size", str(args.batch_size)]
        if args.data_dir:
            command += ["--data-dir", str(Path(args.data_dir).resolve())]
        if args.subset:
            command += ["--subset", str(args.subset)]
        env = {**os.environ, "PYTHONPATH": str(folder)}
        self.proc = subprocess.Popen(command, cwd=folder, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        self.info = self._read()
        imported = Path(self.info["jaxlight"]).resolve()
        if imported != (folder / "jaxlight").resolve():
            self.close()
            raise RuntimeError(f"{label}: the worker imported jaxlight from {imported}, not {folder / 'jaxlight'}")

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.label} worker ({self.folder}) exited with status {self.proc.wait()}; "
                               f"its error is above")
        return json.loads(line)

    def ask(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.close()
            except (BrokenPipeError, ValueError):
                pass
            self.proc.wait(timeout=60)


def checkout(spec: str, scratch: Path) -> tuple[Path, str]:
    """``(folder, description)`` for a folder or a git revision (exported into ``scratch``)."""
    path = Path(spec)
    if path.is_dir():
        return path.resolve(), f"folder {path.resolve()}"
    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", "--quiet", f"{spec}^{{commit}}"],
                         capture_output=True, text=True)
    if rev.returncode:
        raise SystemExit(f"benchmarks.ab: {spec!r} is neither a folder nor a git revision of {ROOT}")
    commit = rev.stdout.strip()
    folder = scratch / commit[:12]
    folder.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder, f"{spec} ({commit[:12]})"


def compare(workers: dict, models: list, epochs: int, lrs: dict) -> list[dict]:
    """Per model: both first epochs, then ``epochs`` steady epochs each, interleaved A B B A ..."""
    rows = []
    for model in models:
        first = {label: w.ask(cmd="first", model=model, lr=lrs[model]) for label, w in workers.items()}
        runs = {label: [] for label in workers}
        for rep in range(epochs):
            order = list(workers) if rep % 2 == 0 else list(reversed(workers))
            for label in order:
                runs[label].append(workers[label].ask(cmd="epoch", model=model))
        med = {label: statistics.median(r["seconds"] for r in runs[label]) for label in workers}
        rows.append({"model": model, "first_epoch_s": {k: v["seconds"] for k, v in first.items()},
                     "median_s": med, "min_s": {k: min(r["seconds"] for r in v) for k, v in runs.items()},
                     "ratio_head_to_base": med["head"] / med["base"], "epochs": runs})
        print(f"{model}: base {med['base']:.3f} s/epoch, head {med['head']:.3f} s/epoch, head/base "
              f"{med['head'] / med['base']:.3f} (min {rows[-1]['min_s']['base']:.3f} / {rows[-1]['min_s']['head']:.3f}); "
              f"load {os.getloadavg()[0]:.2f}", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ab", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", help="folder or git revision to compare against (e.g. main)")
    parser.add_argument("--head", default=str(ROOT), help="folder or git revision under test (default: this tree)")
    parser.add_argument("--models", default="mlp,cnn,lstm")
    parser.add_argument("--epochs", type=int, default=5, help="steady epochs per version and model")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--subset", type=int, default=None, help="train on the first N examples (smoke runs)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default=None, help="write every measurement to this JSON file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.data_dir, args.batch_size, args.subset)
        return 0
    if not args.base:
        parser.error("--base is required (a folder or a git revision, e.g. main)")
    models = args.models.split(",")
    bad = set(models) - {"mlp", "cnn", "lstm"}
    if bad:
        parser.error(f"--models: unknown {sorted(bad)}; choose from mlp, cnn, lstm")
    if args.epochs < 1:
        parser.error("--epochs must be >= 1")

    from benchmarks.hardware import describe
    from jaxlight.recipes import recipe_for

    lrs = {m: recipe_for(m).lr for m in models}
    with tempfile.TemporaryDirectory(prefix="jaxlight-ab-") as scratch:
        (base, base_desc), (head, head_desc) = (checkout(s, Path(scratch) / k)
                                                for k, s in (("base", args.base), ("head", args.head)))
        load_before = list(os.getloadavg())
        hw = describe()
        print(f"CPU {hw['cpu']}, {hw['cores']} cores, {hw['backend']} ({hw['device']}); load before "
              f"{tuple(round(v, 2) for v in load_before)}", flush=True)
        print(f"base: {base_desc}\nhead: {head_desc}", flush=True)
        workers = {}
        try:
            workers["base"] = Worker("base", base, args)
            workers["head"] = Worker("head", head, args)
            rows = compare(workers, models, args.epochs, lrs)
        finally:
            for w in workers.values():
                w.close()
    load_after = list(os.getloadavg())
    print(f"load after {tuple(round(v, 2) for v in load_after)}")
    if args.out:
        record = {"command": " ".join([sys.executable, "-m", "benchmarks.ab", *(argv or sys.argv[1:])]),
                  "hardware": hw, "base": base_desc, "head": head_desc,
                  "workers": {k: w.info for k, w in workers.items()}, "batch_size": args.batch_size,
                  "subset": args.subset, "learning_rates": lrs, "load_before": load_before, "load_after": load_after,
                  "models": rows}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
