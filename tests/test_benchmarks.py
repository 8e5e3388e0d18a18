"""The benchmark suite end to end in its tiny mode: a smoke test, no timing assertions."""

import json
import subprocess
from pathlib import Path

import pytest

from _support import ROOT, run_module


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("bench")
    # --allow-busy: the test machine is shared; whether it was busy is recorded and checked below.
    proc = run_module("benchmarks.run", "--tiny", "--allow-busy", "--out", str(out), "--data-dir", str(data_dir),
                      timeout=900)
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
    if row["status"] == "ok":  # steady state: one fit, the first epoch apart, then one timing per epoch
        assert row["first_epoch_s"] > 0 and len(row["step_seconds"]) == res["settings"]["repeats"]


@pytest.mark.slow
def test_tiny_run_records_the_load_and_marks_a_busy_run(tiny_run):
    out, res = tiny_run
    assert res["load_check"]["threshold"] == 0.5 * res["load_check"]["cores"]
    for row in res["results"]:
        if row["status"] == "ok":
            assert len(row["load_before"]) == 3 and row["load_during"] and len(row["load_after"]) == 3
    assert ("BUSY MACHINE: ratios unreliable" in (out / "results.md").read_text()) == res["busy"]
    assert res["torch_threads_source"] == "torch's default" and f"torch threads: {res['torch_threads']}" in \
        (out / "results.md").read_text()


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
    (["--tta-max-seconds", "-5"], "--tta-max-seconds"),
])
def test_bad_arguments_name_the_culprit(args, culprit, capsys):
    from benchmarks.run import main

    with pytest.raises(SystemExit) as exc:
        main([*args, "--out", "/nonexistent"])
    assert exc.value.code == 2 and culprit in capsys.readouterr().err


@pytest.mark.slow
def test_ab_times_two_checkouts_through_their_own_loop_fit(tmp_path, data_dir):
    """This tree against itself (a folder) and against its own HEAD (a git revision, exported):
    each worker imports its own checkout; both sides train the same epochs."""
    out = tmp_path / "ab.json"
    proc = run_module("benchmarks.ab", "--base", "HEAD", "--models", "mlp", "--epochs", "2", "--subset", "192",
                      "--data-dir", str(data_dir), "--out", str(out), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["workers"]["head"]["jaxlight"] == str(ROOT / "jaxlight")
    assert res["workers"]["base"]["jaxlight"] != res["workers"]["head"]["jaxlight"]  # the exported copy
    assert res["hardware"]["cpu"] and len(res["load_before"]) == 3
    (row,) = res["models"]
    for side in ("base", "head"):
        epochs = row["epochs"][side]
        assert len(epochs) == 2 and all(e["seconds"] > 0 and len(e["load"]) == 3 for e in epochs)
        assert [e["step"] for e in epochs] == [6, 9]  # 192 / 64 = 3 steps an epoch, after the first
    assert row["ratio_head_to_base"] == pytest.approx(row["median_s"]["head"] / row["median_s"]["base"])
    assert "head/base" in proc.stdout


def test_ab_names_a_base_that_is_neither_folder_nor_revision():
    from benchmarks.ab import main

    with pytest.raises(SystemExit, match="no-such-revision"):
        main(["--base", "no-such-revision", "--models", "mlp"])


@pytest.mark.parametrize("script", ["gpu.sh", "gpu_all.sh"])
def test_gpu_script_is_valid_bash(script):
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / script)], check=True)


@pytest.mark.slow  # fast counterpart: test_fsdp.py::test_parameters_and_optimizer_state_take_one_nth_per_device[8]
def test_strategy_memory_measures_one_nth_per_device_under_fsdp(tmp_path):
    """benchmarks/strategy_memory.py on a narrow MLP over the tests' 8 fake devices, in process:
    fsdp keeps 1/8 of the parameters + Adam state per device (64-wide layers all divide by 8;
    the last bias of 10 and Adam's count stay whole), sharded all of it."""
    from benchmarks.strategy_memory import main

    assert main(["--no-timing", "--widths", "784", "64", "64", "10", "--batch-size", "16", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "strategy_memory.json").read_text())
    total = result["model"]["params_and_opt_state_bytes"]
    assert total == 4 * 3 * (784 * 64 + 64 + 64 * 64 + 64 + 64 * 10 + 10) + 4  # params, mu, nu + count
    whole = 4 * 3 * 10 + 4  # fc2's bias and its moments, the count
    runs = {(r["strategy"], r["devices"]): r for r in result["runs"]}
    assert runs["fsdp", 8]["state_bytes_per_device"] == [(total - whole) // 8 + whole] * 8
    assert runs["sharded", 8]["state_bytes_per_device"] == [total] * 8
    assert runs["single", 1]["state_bytes_per_device"] == [total]
    assert runs["fsdp", 8]["step_s"] is None and runs["fsdp", 8]["layout"] == "fsdp"


def test_the_fsdp_memory_table_in_the_docs_is_the_committed_result():
    """docs/parallel.md's memory table shows the numbers of the file it names."""
    result = json.loads((ROOT / "benchmarks/results/cpu-2core-intel-xeon/strategies-fsdp/strategy_memory.json").read_text())
    page = (ROOT / "docs" / "parallel.md").read_text()
    total = result["model"]["params_and_opt_state_bytes"]
    for run in result["runs"]:
        per, memory = max(run["state_bytes_per_device"]), run["memory_analysis"]
        row = (f"| {run['strategy']} | {run['devices']} | {per / 1e6:.1f} | {per / total:.3f} | "
               f"{memory['argument'] / 1e6:.1f} | {memory['temp'] / 1e6:.1f} | {memory['output'] / 1e6:.1f} |")
        assert row in page, row


def test_committed_results_are_readable():
    """Every committed results.json renders with the current report code."""
    from benchmarks.report import markdown

    for path in (ROOT / "benchmarks" / "results").glob("*/results.json"):
        assert "| model | batch |" in markdown(json.loads(path.read_text())), path


# -- the busy-machine guard, with simulated load averages ----------------------------------------

@pytest.mark.parametrize("load,cores,busy", [((0.9, 3.0, 3.0), 2, False), ((1.01, 0.1, 0.1), 2, True),
                                             ((3.9, 0, 0), 8, False), ((4.5, 0, 0), 8, True)])
def test_load_guard_refuses_above_half_a_task_per_core(load, cores, busy):
    from benchmarks.run import BusyMachine, check_load

    if busy:
        with pytest.raises(BusyMachine, match="--allow-busy"):
            check_load(False, cores, load)
    else:
        assert check_load(False, cores, load)["busy"] is False
    assert check_load(True, cores, load)["busy"] is busy  # allowed: runs, and says so


def test_busy_machine_refuses_before_doing_anything(monkeypatch, tmp_path, capsys):
    import benchmarks.run as bench

    monkeypatch.setattr(bench, "loadavg", lambda: (12.0, 11.0, 10.0))
    assert bench.main(["--tiny", "--out", str(tmp_path)]) == 3
    assert "refusing to benchmark" in capsys.readouterr().err and not list(tmp_path.iterdir())


def _fake_results(busy_at_start: bool, load_during: float) -> dict:
    load = [2.5 if busy_at_start else 0.3, 0.3, 0.3]
    row = {"model": "mlp", "batch_size": 64, "status": "ok", "reason": "", "samples_per_s": 1000.0, "s_per_epoch": 1.0,
           "fraction_of_peak": 0.5, "warmup_s": 1.0, "compile_s": 0.5, "load_before": load,
           "load_during": [[load_during, 0.3, 0.3]], "load_after": load}
    tta = {"model": "mlp", "batch_size": 64, "target": 0.97, "status": "ok", "reached": True, "seconds": 5.0,
           "compile_s": 1.0, "train_s": 4.0, "epochs": 1.0, "curve": [[5.0, 938, 0.97]], "seed": 0,
           "load_before": load, "load_after": load}
    return {"hardware": {"device": "cpu", "cpu": "fake", "cores": 2, "backend": "cpu", "load_average_at_start": load},
            "peak": {"peak_flops": 1e11, "jax_flops": 1e11, "torch_flops": 1e11, "n": 256},
            "settings": {"mode": "tiny", "repeats": 1, "lr": {}}, "torch_threads": 2,
            "torch_threads_source": "torch's default",
            "load_check": {"load": load, "cores": 2, "threshold": 1.0, "busy": busy_at_start}, "busy": busy_at_start,
            "results": [{**row, "variant": "jax_fused", "ratio_to_fused": 1.0},
                        {**row, "variant": "torch_memory", "samples_per_s": 250.0, "ratio_to_fused": 0.25}],
            "tta": [{**tta, "variant": "jax_fused"}, {**tta, "variant": "torch_memory", "seed": 1}]}


@pytest.mark.parametrize("busy_at_start,load_during,marked", [(False, 0.4, False), (True, 0.4, True),
                                                               (False, 2.4, False), (False, 3.5, True)])
def test_every_table_of_a_busy_run_is_marked(busy_at_start, load_during, marked):
    """Busy at the start (run with --allow-busy), or busy at some point during the run beyond
    the benchmark's own load (one task per core: 2.4 on 2 cores is the benchmark itself)."""
    from benchmarks.report import markdown
    from benchmarks.run import _mark_if_busy

    res = _fake_results(busy_at_start, load_during)
    _mark_if_busy(res)
    text = markdown(res)
    tables = text.count("\n| model |")
    assert tables == 4  # throughput, targets, time to accuracy summary and runs
    assert text.count("BUSY MACHINE: ratios unreliable") == (tables if marked else 0)
    assert res["busy"] is marked
