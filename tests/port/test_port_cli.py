"""``jaxlight port MODULE:CALLABLE --input SPEC --out DIR``: exit 0 when parity holds, 3 when it
does not, 2 for a usage error or an op it cannot port (one error line)."""

import textwrap

import pytest

from _support import one_line_error, run_module

NETS = textwrap.dedent('''
    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self, hidden: int = 8):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 4 * 4, hidden)
            self.out = nn.Linear(hidden, 3)

        def forward(self, x):
            x = nn.functional.max_pool2d(torch.relu(self.conv(x)), 2)
            return self.out(torch.relu(self.fc(x.flatten(1))))


    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(50, 8)
            self.fc = nn.Linear(8, 2)

        def forward(self, ids):
            return self.fc(self.embed(ids).mean(1))


    class Counter(nn.Module):
        """Python state the trace bakes in: each training call scales by the number of training
        calls so far (the port keeps the value it had when traced)."""

        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)
            self.calls = 0

        def forward(self, x):
            if self.training:
                self.calls += 1
            return self.fc(x) * self.calls


    class Unsupported(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return torch.fft.rfft(self.fc(x)).real


    def make(width):
        return Net(hidden=width)
''')


@pytest.fixture
def nets(tmp_path):
    path = tmp_path / "nets.py"
    path.write_text(NETS)
    return path


def port(*args, **kwargs):
    return run_module("jaxlight.cli", "port", *args, timeout=900, **kwargs)


@pytest.mark.integration
def test_parity_holds_exit_0_and_the_folder_is_written(nets, tmp_path):
    out = tmp_path / "out"
    proc = port(f"{nets}:make", "--init-args", '{"width": 6}', "--input", "float32[4,1,8,8]", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "parity holds" in proc.stdout and "forward (train)" in proc.stdout
    assert (out / "config.yaml").is_file() and (out / "step_000000000" / "manifest.json").is_file()
    assert "pass" in (out / "report.txt").read_text()


@pytest.mark.integration
def test_token_ids_are_drawn_below_the_embedding_size(nets, tmp_path):
    proc = port(f"{nets}:Tokens", "--input", "int64[4,6]", "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import numpy as np

    ids = np.load(tmp_path / "out" / "examples.npz")["input_0"]
    assert ids.shape == (4, 6) and ids.min() >= 0 and ids.max() < 50


@pytest.mark.integration
def test_parity_that_does_not_hold_exits_3(nets, tmp_path):
    proc = port(f"{nets}:Counter", "--input", "float32[4,4]", "--out", str(tmp_path / "out"))
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "FAIL" in proc.stdout
    one_line_error(proc, "parity does not hold", "outputs (every layer with weights agrees)")
    assert (tmp_path / "out" / "report.txt").is_file()  # (written all the same, to inspect)


@pytest.mark.integration
def test_an_unsupported_op_exits_2_naming_it(nets, tmp_path):
    proc = port(f"{nets}:Unsupported", "--input", "float32[4,4]", "--out", str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    one_line_error(proc, "rfft", "nets.py")
    assert not (tmp_path / "out" / "config.yaml").exists()


@pytest.mark.parametrize("args, culprit", [
    (["nets_missing.py:Net", "--input", "float32[2,4]"], "no such file"),
    (["{nets}:Nope", "--input", "float32[2,4]"], "has no attribute 'Nope'"),
    (["{nets}", "--input", "float32[2,4]"], "MODULE:CALLABLE"),
    (["{nets}:Net", "--input", "float32[2,x]"], "--input 'float32[2,x]'"),
    (["{nets}:Net", "--input", "complex64[2,4]"], "unknown dtype 'complex64'"),
    (["{nets}:Net", "--input", "float32[2,4]:9"], "bounds integers only"),
    (["{nets}:Net"], "--input"),
    (["{nets}:Net", "--init-args", "[1]", "--input", "float32[2,1,8,8]"], "--init-args"),
    (["{nets}:Net", "--init-args", '{"depth": 3}', "--input", "float32[2,1,8,8]"], "unexpected keyword"),
    (["{nets}:Net", "--input", "float32[2,1,8,8]", "float32[3,4]"], "unrecognized"),
    (["{nets}:Net", "--input", "float32[2,1,8,8]", "--fit-data", "digits"], "--fit-data 'digits'"),
])
def test_usage_errors_exit_2_with_one_line(nets, tmp_path, args, culprit, capsys):
    from jaxlight.cli import main

    args = [a.replace("{nets}", str(nets)) for a in args]
    try:
        code = main(["port", *args, "--out", str(tmp_path / "out")])
    except SystemExit as exc:  # (argparse and run_cli's usage errors exit 2 as argparse does)
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert culprit in err and "Traceback" not in err, err
