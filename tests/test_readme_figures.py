"""Every speed figure on the README's front page equals the committed result file it names, at
the README's rounding: the headline (one H200) and the section "Speed on a quiet 2-core CPU"
(its table and its time-to-accuracy line).

The README names each figure's file beside it (a Markdown link to a ``results.json``), and
this test reads whatever file that is: new measurements need only the README and the file to
agree. Pure text and JSON: no jax, well under a second.
"""

import json
import re
import statistics
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
RESULT_LINK = r"\]\(([^)\s]+/results\.json)\)"


def _section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end != -1 else None]


def _load(link: str) -> dict:
    path = ROOT / link
    assert path.is_file(), f"README.md names {link}, which does not exist"
    return json.loads(path.read_text())


def _shown(value: float, like: str) -> str:
    """``value`` at the rounding of the README's ``like`` ("0.83", "79", "3.34")."""
    decimals = len(like.partition(".")[2])
    return f"{value:.{decimals}f}"


def _throughput(results: dict, model: str, variant: str, batch_size: int = 64) -> dict:
    rows = [r for r in results["results"]
            if (r["model"], r["variant"], r["batch_size"]) == (model, variant, batch_size) and r["status"] == "ok"]
    assert len(rows) == 1, f"{len(rows)} rows for {model} {variant} batch {batch_size}"
    return rows[0]


def _tta(results: dict, model: str, variant: str, target: float) -> list[dict]:
    runs = [r for r in results["tta"] if (r["model"], r["variant"], r["target"]) == (model, variant, target)]
    assert runs and all(r["reached"] for r in runs), f"{model} {variant}: not every run reached {target}"
    return runs


def _flat(text: str) -> str:
    return re.sub(r"\s+", " ", text)


# --- the headline --------------------------------------------------------------------------------

def test_headline_time_to_99_percent_on_the_gpu():
    text = _flat(README[:README.index("\n## ")])
    m = re.search(r"99% MNIST test accuracy in ([\d.]+) s, compilation included \(\[result" + RESULT_LINK
                  + r"; ([\d.]+) s with a cold cache: \[result" + RESULT_LINK, text)
    assert m, "the headline's time to 99% and its two result files were not found"
    warm, warm_file, cold, cold_file = m.groups()
    (warm_run,) = _tta(_load(warm_file), "cnn", "jax_fused", 0.99)
    (cold_run,) = _tta(_load(cold_file), "cnn", "jax_fused", 0.99)
    assert _shown(warm_run["seconds"], warm) == warm
    assert _shown(cold_run["seconds"], cold) == cold


def test_headline_throughput_ratio_on_the_gpu():
    text = _flat(README[:README.index("\n## ")])
    m = re.search(r"trained (\d+)x as many examples per second as PyTorch's in-memory loop \(\[result" + RESULT_LINK,
                  text)
    assert m, "the headline's throughput ratio and its result file were not found"
    shown, link = m.groups()
    results = _load(link)
    ratio = (_throughput(results, "mlp", "jax_fused")["samples_per_s"]
             / _throughput(results, "mlp", "torch_memory")["samples_per_s"])
    assert _shown(ratio, shown) == shown


# --- the CPU section -----------------------------------------------------------------------------

CPU = _section("Speed on a quiet 2-core CPU")


def _runs() -> list[dict]:
    """The result files of "run 1", "run 2", ... in the order the text names them."""
    links = re.findall(r"run (\d+):\s*\[results\.json" + RESULT_LINK, CPU)
    assert links, "the CPU section names no run's results.json"
    assert [int(n) for n, _ in links] == list(range(1, len(links) + 1))
    return [_load(link) for _, link in links]


def _table() -> list[list[str]]:
    lines = [line for line in CPU.splitlines() if line.startswith("|")]
    assert len(lines) > 2, "the CPU section has no table"
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def _pairs(cell: str, runs: int, unit: str = "") -> list[str]:
    values = [v.strip() for v in cell.split("/")]
    assert len(values) == runs, f"{cell!r}: one value per run ({runs})"
    assert all(v.endswith(unit) for v in values), cell
    return [v[:len(v) - len(unit)] if unit else v for v in values]


def _verdict(meets: list[bool]) -> str:
    return "met" if all(meets) else "missed" if not any(meets) else "mixed"


def test_the_setup_line_matches_the_runs():
    runs = _runs()
    text = _flat(CPU)
    jax_version, torch_version, load = re.search(
        r"jax ([\d.]+), torch ([\d.]+) with \d+ threads, load ([\d.]+) at (?:each|the) start", text).groups()
    for results in runs:
        assert results["versions"]["jax"] == jax_version
        assert results["versions"]["torch"].split("+")[0] == torch_version
        assert _shown(results["hardware"]["load_average_at_start"][0], load) == load
        assert results["hardware"]["cores"] == 2 and not results["busy"]


@pytest.mark.parametrize("row", range(len(_table())))
def test_cpu_table_row(row):
    runs = _runs()
    model, fused, torch, ratio, goal, verdict = _table()[row]
    if fused.endswith("of the matmul peak"):  # "37% / 30% of the matmul peak"
        shown = _pairs(fused.removesuffix(" of the matmul peak"), len(runs), "%")
        peak = [_throughput(r, model, "jax_fused")["fraction_of_peak"] * 100 for r in runs]
        assert [_shown(p, s) for p, s in zip(peak, shown)] == shown
        assert verdict == _verdict([p >= float(goal.rstrip("%")) for p in peak])
        return
    fused_s = [_throughput(r, model, "jax_fused")["s_per_epoch"] for r in runs]
    torch_s = [_throughput(r, model, "torch_memory")["s_per_epoch"] for r in runs]
    ratios = [t / f for t, f in zip(torch_s, fused_s)]
    for values, cell, unit in ((fused_s, fused, ""), (torch_s, torch, ""), (ratios, ratio, "x")):
        shown = _pairs(cell, len(runs), unit)
        assert [_shown(v, s) for v, s in zip(values, shown)] == shown, f"{model}: {cell}"
    assert verdict == _verdict([r >= float(goal.rstrip("x")) for r in ratios])


@pytest.mark.parametrize("pattern, model, target", [
    (r"To 99% test accuracy the CNN takes ([\d.]+) ± ([\d.]+) s of training on [^,;(]*? against "
     r"torch's ([\d.]+) ± ([\d.]+) s [^\[]*\[result" + RESULT_LINK, "cnn", 0.99),
    (r"the MLP reaches 97% in ([\d.]+) ± ([\d.]+) s against ([\d.]+) ± ([\d.]+) s \(\[result" + RESULT_LINK,
     "mlp", 0.97),
])
def test_time_to_accuracy_on_the_cpu(pattern, model, target):
    """Mean ± standard deviation over the seeds of the training time without the compile share
    (``seconds - compile_s``), as benchmarks.report prints it."""
    m = re.search(pattern, _flat(CPU))
    assert m, f"the {model} time-to-accuracy figures and their result file were not found"
    *shown, link = m.groups()
    results = _load(link)
    for variant, (mean, std) in zip(("jax_fused", "torch_memory"), (shown[:2], shown[2:])):
        train = [r["seconds"] - r["compile_s"] for r in _tta(results, model, variant, target)]
        assert _shown(statistics.mean(train), mean) == mean, (variant, train)
        assert _shown(statistics.stdev(train), std) == std, (variant, train)


def test_a_figure_that_disagrees_with_its_file_is_caught():
    """The checks compare at the README's rounding, so a figure off by one in its last digit fails."""
    assert _shown(0.8259, "0.83") == "0.83" and _shown(0.8259, "0.82") != "0.82"
    assert _shown(78.94, "79") == "79" and _verdict([True, False]) == "mixed"
