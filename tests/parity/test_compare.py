"""``jaxlight compare``: the command end to end (on the synthetic regression: seconds), and its
table, files and flag checks."""

import json

import pytest

from jaxlight.bridge.compare import render_markdown, render_table


def test_compare_command_writes_table_json_markdown_and_plot(cli_main, tmp_path):
    out = tmp_path / "cmp"
    proc = cli_main("jaxlight", "compare", "--model", "linear", "--seeds", "2", "--epochs", "2", "--torch-threads", "1",
               "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "framework" in proc.stdout and "jaxlight" in proc.stdout and "torch" in proc.stdout
    payload = json.loads((out / "compare.json").read_text())
    assert payload["model"] == "linear" and payload["seeds"] == [0, 1] and payload["metric"] == "mse"
    for f in ("jaxlight", "torch"):
        s = payload["frameworks"][f]
        assert len(s["values"]) == 2 and len(s["test_history"][0]) == 2
        assert len(s["step_losses"][0]) == 2 * 128  # 2 epochs x 8192 / 64 steps
    assert payload["torch_threads"] == 1
    assert payload["agree"], proc.stdout
    assert (out / "compare.md").read_text().startswith("## linear: jaxlight vs torch")
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("flags, message", [
    (["--seeds", "0"], "--seeds must be >= 1"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--torch-threads", "0"], "--torch-threads must be >= 1"),
    (["--model", "resnet"], "invalid choice: 'resnet'"),
])
def test_compare_rejects_bad_flags(flags, message, tmp_path, capsys):
    from jaxlight.cli import main

    with pytest.raises(SystemExit) as exc:  # in-process: the flags are checked before any training
        main(["compare", *flags, "--out", str(tmp_path)])
    assert exc.value.code != 0 and message in f"{exc.value.code} {capsys.readouterr().err}"
    assert not (tmp_path / "compare.json").exists()


def _payload(metric, jax_values, torch_values, agree):
    stats = lambda v: {"mean": sum(v) / len(v), "std": 0.001, "seconds_per_epoch": 1.0,  # noqa: E731
                       "first_epoch_seconds": 2.0}
    return {"model": "mlp", "metric": metric, "seeds": [0, 1],
            "recipe": {"optimizer": "adam", "lr": 0.01, "batch_size": 64, "epochs": 1},
            "frameworks": {"jaxlight": stats(jax_values), "torch": stats(torch_values)},
            "difference": 0.001, "tolerance": 0.003, "tolerance_rule": "rule", "agree": agree,
            "backend": "cpu", "torch_threads": 1}


@pytest.mark.parametrize("agree, word", [(True, "AGREE"), (False, "DISAGREE")])
def test_table_reports_the_verdict(agree, word):
    payload = _payload("accuracy", [0.97, 0.971], [0.969, 0.97], agree)
    table = render_table(payload)
    assert f": {word}" in table and "97.05 ± 0.10" in table
    assert "| jaxlight | 97.05 ± 0.10 | 1.00 | 2.00 |" in render_markdown(payload)
