"""The benchmark suite end to end in its tiny mode: a smoke test, no timing assertions."""

import json
import subprocess
from pathlib import Path

import pytest

from _support import ROOT, run_module


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("bench")
    proc = run_module("benchmarks.run", "--tiny", "--out", str(out), "--data-dir", str(data_dir), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_tiny_run_writes_json_table_and_plots(tiny_run):
    out, res = tiny_run
    for name in ("results.json", "results.md", "throughput.png", "time_to_accuracy.png"):
        assert (out / name).stat().st_size > 0, name
    assert {"hardware", "versions", "settings", "peak", "flops", "results", "tta"} <= set(res)
    assert res["settings"]["mode"] == "tiny" and res["peak"]["peak_flops"] > 0
    assert res["flops"]["mlp"]["64"]["xla"] > 0
    table = (out / "results.md").read_text()
    assert "| mlp | 64 | jaxlight fused |" in table and "Time to target test accuracy" in table


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["jax_fused", "jax_step", "torch_dataloader", "torch_memory", "lightning"])
def test_tiny_run_measures_each_variant(tiny_run, variant):
    _, res = tiny_run
    row = next(r for r in res["results"] if r["variant"] == variant)
    assert row["status"] == "ok", row["reason"]
    assert row["samples_per_s"] > 0 and row["s_per_epoch"] > 0 and row["warmup_s"] > 0
    assert len(row["step_seconds"]) == res["settings"]["repeats"] and row["timed_steps"] >= row["window_steps"]
    assert row["ratio_to_fused"] > 0 and 0 < row["fraction_of_peak"]


@pytest.mark.slow
def test_trainer_variant_runs_or_says_why(tiny_run):
    _, res = tiny_run
    row = next(r for r in res["results"] if r["variant"] == "jax_trainer")
    assert row["status"] == "ok" or (row["status"] == "skipped" and "jaxlight.trainer" in row["reason"])


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["jax_fused", "torch_memory"])
def test_tiny_run_reaches_the_tiny_accuracy_target(tiny_run, variant):
    _, res = tiny_run
    t = next(t for t in res["tta"] if t["variant"] == variant)
    assert t["status"] == "ok" and t["reached"], t
    assert t["curve"][-1][2] >= t["target"] and t["seconds"] >= t["compile_s"] >= 0


@pytest.mark.parametrize("args,culprit", [
    (["--models", "mlp,resnet"], "resnet"),
    (["--variants", "jax_fused,tensorflow"], "tensorflow"),
    (["--tta", "mlp:0.97"], "mlp:0.97"),
])
def test_bad_arguments_name_the_culprit(args, culprit, capsys):
    from benchmarks.run import main

    with pytest.raises(SystemExit) as exc:
        main([*args, "--out", "/nonexistent"])
    assert exc.value.code == 2 and culprit in capsys.readouterr().err


def test_gpu_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu.sh")], check=True)


def test_committed_results_are_readable():
    """Every committed results.json renders with the current report code."""
    from benchmarks.report import markdown

    for path in (ROOT / "benchmarks" / "results").glob("*/results.json"):
        assert "| model | batch |" in markdown(json.loads(path.read_text())), path
