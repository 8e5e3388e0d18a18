"""The benchmark suite times ported models: the port of a built-in beside the hand-written model
(``jax_ported``), and a ported model against its torch original (``--ported``). A smoke test in
the suite's tiny mode: every row runs; no timing is asserted."""

import json

import pytest

from _support import run_module


@pytest.mark.slow
def test_the_suite_times_ported_models(tmp_path, data_dir):
    out = tmp_path / "bench"
    proc = run_module("benchmarks.run", "--tiny", "--allow-busy", "--no-tta", "--models", "mlp", "--variants",
                      "jax_fused,jax_ported,torch_memory", "--ported", "torch_ref.models:SoftmaxRegression",
                      "--out", str(out), "--data-dir", str(data_dir), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    rows = {(r["model"], r["variant"]): r for r in res["results"]}
    assert set(rows) == {(m, v) for m in ("mlp", "ported:SoftmaxRegression")
                         for v in ("jax_fused", "jax_ported", "torch_memory")}
    for key, row in rows.items():
        assert row["status"] == "ok", (key, row["reason"])
        assert row["samples_per_s"] > 0 and row["ratio_to_fused"] > 0
    assert rows[("ported:SoftmaxRegression", "jax_fused")]["fraction_of_peak"] is None  # (no FLOP count)
    table = (out / "results.md").read_text()
    assert "| mlp | 64 | jaxlight fused, ported |" in table and "| ported:SoftmaxRegression | 64 |" in table


def test_a_ported_model_that_cannot_be_loaded_is_refused(capsys):
    from benchmarks.run import main

    with pytest.raises(SystemExit) as exc:
        main(["--ported", "torch_ref.models:Nope", "--out", "/nonexistent"])
    assert exc.value.code == 2 and "Nope" in capsys.readouterr().err
