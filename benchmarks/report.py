"""The markdown table and the PNG plots, from the JSON a run wrote (``python -m benchmarks.report
results.json`` redraws them)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

__all__ = ["markdown", "plots", "write_all"]

LABELS = {"jax_fused": "jaxlight fused", "jax_step": "jaxlight per-step", "jax_trainer": "jaxlight Trainer",
          "torch_dataloader": "torch tutorial DataLoader", "torch_memory": "torch in-memory",
          "torch_compile": "torch.compile", "lightning": "Lightning Trainer", "jax_ported": "jaxlight fused, ported"}


def _fmt(x, spec=".3g"):
    return "-" if x is None else format(x, spec)


def _percent(x):
    return None if x is None else 100 * x


def _load(values) -> str:
    return "-" if not values else ", ".join(f"{v:.1f}" for v in values)


# The CPU goals at batch 64: (model, metric, other variant or None, goal).
TARGETS = (("mlp", "x torch in-memory", "torch_memory", 3.0), ("mlp", "x tutorial DataLoader", "torch_dataloader", 10.0),
           ("mlp", "fraction of matmul peak", None, 0.65), ("cnn", "x torch in-memory", "torch_memory", 1.2),
           ("lstm", "x torch in-memory", "torch_memory", 1.1))
BUSY_MARK = "BUSY MACHINE: ratios unreliable"


def _busy(res: dict) -> list[str]:
    """The line every table of a busy run starts with (empty for a quiet run)."""
    if not res.get("busy"):
        return []
    return [f"**{BUSY_MARK}** ({res.get('busy_reason', 'load above the threshold')}; threshold "
            f"{res.get('load_check', {}).get('threshold', '?')} = 0.5 per core)", ""]


def _load_range(r: dict) -> str:
    """The 1-minute load averages a row saw, before -> max during -> after."""
    during = [l[0] for l in r.get("load_during", []) if l]
    parts = [r.get("load_before"), max(during) if during else None, r.get("load_after")]
    parts = [p[0] if isinstance(p, list) else p for p in parts]
    return "-" if all(p is None for p in parts) else "/".join("-" if p is None else f"{p:.1f}" for p in parts)


def tta_summary(res: dict) -> list[dict]:
    """Time to accuracy per (model, variant, target) over seeds: mean and standard deviation of
    the seconds (compilation included), the compile estimate and the training time without it."""
    import statistics

    groups = {}
    for t in res.get("tta", []):
        if t.get("status", "ok") == "ok":
            groups.setdefault((t["model"], t["batch_size"], t["variant"], t["target"]), []).append(t)
    out = []
    for (model, batch, variant, target), runs in groups.items():
        reached = [t for t in runs if t["reached"]]

        def stat(key):
            values = [t[key] for t in reached if t.get(key) is not None]
            if not values:
                return None, None
            return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0

        out.append({"model": model, "batch_size": batch, "variant": variant, "target": target,
                    "seeds": [t.get("seed") for t in runs], "reached": len(reached), "runs": len(runs),
                    "seconds": stat("seconds"), "compile_s": stat("compile_s"), "train_s": stat("train_s"),
                    "epochs": stat("epochs")})
    return out


def _pm(ms, spec=".1f"):
    mean, std = ms
    return "-" if mean is None else f"{mean:{spec}} ± {std:{spec}}"


def targets(res: dict, batch_size: int = 64) -> list[dict]:
    """jaxlight fused against the targets, measured in this run."""
    def row(model, variant):
        return next((r for r in res["results"] if r["model"] == model and r["batch_size"] == batch_size
                     and r["variant"] == variant and "samples_per_s" in r), None)

    out = []
    for model, metric, other, goal in TARGETS:
        fused, ref = row(model, "jax_fused"), row(model, other) if other else None
        if fused is None or (other and ref is None):
            continue
        value = fused["samples_per_s"] / ref["samples_per_s"] if other else fused["fraction_of_peak"]
        out.append({"model": model, "metric": metric, "goal": goal, "value": value, "met": value >= goal})
    return out


def markdown(res: dict) -> str:
    hw, peak = res["hardware"], res["peak"]
    lines = [f"# Benchmark: {hw['device']} ({hw['cpu']}, {hw['cores']} cores, backend {hw['backend']})", "",
             f"Mode `{res['settings']['mode']}`; {res['settings']['repeats']} interleaved repeats, medians. "
             f"Matmul peak measured in this run: {peak['peak_flops'] / 1e9:.1f} GFLOP/s "
             f"(jax {peak['jax_flops'] / 1e9:.1f}, torch {peak['torch_flops'] / 1e9:.1f}; "
             f"{peak['n']}x{peak['n']} float32). torch threads: {res.get('torch_threads')} "
             f"({res.get('torch_threads_source', 'see the command')}). Adam, learning rates "
             f"{res['settings'].get('lr')}. "
             f"Load average (1, 5, 15 min) at start: {_load(hw.get('load_average_at_start'))}, "
             f"at the end: {_load(res.get('load_average_at_end'))}.", ""]
    if res["results"]:
        lines += [*_busy(res),
                  "| model | batch | variant | samples/s | s/epoch | x fused | % peak | first call s | compile s (est.) "
                  "| peak mem MB | load before/max/after |",
                  "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in res["results"]:
        if r["status"] != "ok":
            lines.append(f"| {r['model']} | {r['batch_size']} | {LABELS[r['variant']]} | {r['status']}: "
                         f"{r['reason'][:80]} | | | | | | | |")
            continue
        first = f"{r['warmup_s']:.2f}" + (" (1st epoch)" if "first_epoch_s" in r else "")
        lines.append(f"| {r['model']} | {r['batch_size']} | {LABELS[r['variant']]} | {r['samples_per_s']:,.0f} | "
                     f"{r['s_per_epoch']:.2f} | {_fmt(r.get('ratio_to_fused'), '.2f')} | "
                     f"{_fmt(_percent(r.get('fraction_of_peak')), '.1f')} | {first} | {_fmt(r.get('compile_s'), '.2f')} | "
                     f"{_fmt(r.get('peak_mem_mb'), '.0f')} | {_load_range(r)} |")
    if any(r.get("timing") == "whole epochs" for r in res["results"]):
        lines += ["", "jaxlight: whole epochs of `loop.fit` (fused, per-step) and `Trainer.fit`, one per repeat; "
                  "s/epoch is their median, first call s the first epoch (compilation included), compile s that "
                  "minus a steady epoch. torch and Lightning: windows of steps; s/epoch is the median step time x "
                  "steps per epoch, first call s the first window, compile s that minus as many steady steps."]
    elif res["results"]:
        lines += ["", "First call: the variant's first window (jaxlight fused: one compiled chunk; the Trainer: its "
                  "whole first epoch), compilation included; compile s: that minus the same number of steady steps."]
    met = targets(res)
    if met:
        lines += ["", "## Targets: jaxlight fused at batch 64, same run", "", *_busy(res),
                  "| model | measure | goal | measured | |",
                  "| --- | --- | ---: | ---: | --- |"]
        lines += [f"| {t['model']} | {t['metric']} | {t['goal']:g} | {t['value']:.2f} | {'met' if t['met'] else 'missed'} |"
                  for t in met]
    if res.get("tta"):
        summary = tta_summary(res)
        if summary:
            lines += ["", "## Time to target test accuracy over seeds (mean ± std of the runs that reached it)", "",
                      *_busy(res),
                      "| model | batch | variant | target | reached | seconds (compile included) | compile (est.) "
                      "| seconds without compile | epochs |",
                      "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
            lines += [f"| {t['model']} | {t['batch_size']} | {LABELS[t['variant']]} | {t['target']} | "
                      f"{t['reached']}/{t['runs']} | {_pm(t['seconds'])} | {_pm(t['compile_s'])} | {_pm(t['train_s'])} | "
                      f"{_pm(t['epochs'], '.2f')} |" for t in summary]
            lines += ["", "Each variant's first seed compiles cold; later seeds reuse the process's compilations "
                      "(Lightning: its imports and setup), so the seconds without the compile share are the ones "
                      "to compare."]
        lines += ["", "## Time to target test accuracy, each run (compilation included, evaluation excluded)", "",
                  *_busy(res),
                  "| model | batch | variant | seed | target | seconds | of which compile (est.) | epochs | final accuracy |",
                  "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for t in res["tta"]:
            if t.get("status", "ok") != "ok":
                lines.append(f"| {t['model']} | {t['batch_size']} | {LABELS[t['variant']]} | {t.get('seed', '-')} | "
                             f"{t['target']} | {t['status']}: {t['reason'][:60]} | | | |")
                continue
            acc = t["curve"][-1][2] if t["curve"] else None
            seconds = f"{t['seconds']:.1f}" if t["reached"] else f"not reached ({t['curve'][-1][0]:.0f} s)"
            lines.append(f"| {t['model']} | {t['batch_size']} | {LABELS[t['variant']]} | {t.get('seed', '-')} | "
                         f"{t['target']} | {seconds} | {_fmt(t.get('compile_s'), '.1f')} | {t['epochs']:.2f} | {_fmt(acc, '.4f')} |")
    if res.get("flops"):
        lines += ["", "FLOPs per training step (matmuls and convolutions, analytic: what % peak uses; "
                  "XLA's cost analysis of the compiled step, which counts a scan body once):", ""]
        for model, per_b in res["flops"].items():
            lines.append(f"- {model}: " + ", ".join(f"B={b}: {v['analytic'] / 1e9:.3f} GFLOP (XLA {v['xla'] / 1e9:.3f})"
                                                   for b, v in per_b.items()))
    return "\n".join(lines) + "\n"


def plots(res: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    ok = [r for r in res["results"] if r["status"] == "ok"]
    models = list(dict.fromkeys(r["model"] for r in ok))
    if models:
        fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
        for ax, model in zip(axes[0], models):
            rows = [r for r in ok if r["model"] == model]
            sizes = sorted({r["batch_size"] for r in rows})
            names = [v for v in LABELS if any(r["variant"] == v for r in rows)]
            width = 0.8 / max(len(names), 1)
            for i, name in enumerate(names):
                ys = [next((r["samples_per_s"] for r in rows if r["variant"] == name and r["batch_size"] == b), 0)
                      for b in sizes]
                ax.bar([j + i * width for j in range(len(sizes))], ys, width, label=LABELS[name])
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sizes))], [str(b) for b in sizes])
            ax.set_yscale("log")
            ax.set_title(model)
            ax.set_xlabel("batch size")
            ax.set_ylabel("training samples/s (log)")
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"Training throughput, {res['hardware']['device']} ({res['hardware']['cores']} cores)")
        fig.tight_layout()
        path = out / "throughput.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    tta = [t for t in res.get("tta", []) if t.get("status", "ok") == "ok"]
    tmodels = list(dict.fromkeys(t["model"] for t in tta))
    if tmodels:
        fig, axes = plt.subplots(1, len(tmodels), figsize=(5 * len(tmodels), 4), squeeze=False)
        for ax, model in zip(axes[0], tmodels):
            for t in (t for t in tta if t["model"] == model):
                xs, ys = [c[0] for c in t["curve"]], [c[2] for c in t["curve"]]
                ax.plot(xs, ys, marker="o", label=LABELS[t["variant"]])
                ax.axhline(t["target"], color="grey", linestyle=":")
            ax.set_title(f"{model}: test accuracy vs training time")
            ax.set_xlabel("seconds (compilation included)")
            ax.set_ylabel("test accuracy")
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / "time_to_accuracy.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_all(res: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / "results.md").write_text(markdown(res))
    return [out / "results.json", out / "results.md", *plots(res, out)]


if __name__ == "__main__":
    path = Path(sys.argv[1])
    for p in write_all(json.loads(path.read_text()), path.parent):
        print(p)
