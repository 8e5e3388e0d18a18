"""``jaxlight port MODULE:CALLABLE --input SPEC [--input SPEC ...] --out DIR``: port a torch model
from the command line, print the parity table, write the port.

``MODULE`` is a dotted module (importable from the working directory or the environment) or the
path of a ``.py`` file; ``CALLABLE`` a ``torch.nn.Module`` class, or a function returning a
module, called with ``--init-args`` (a JSON object). Each ``--input`` is one positional argument
of ``forward``, ``DTYPE[D0,D1,...]``, drawn from ``--seed``:

- floating point (``float32``, ``float64``, ``float16``, ``bfloat16``): standard normal;
- integers (``int64``, ``int32``, ``uint8``) for embeddings and indices: uniform in ``[0, N)``,
  ``N`` the smallest ``num_embeddings`` of the module's ``nn.Embedding`` layers (256 for
  ``uint8``, 2 when the module has no embedding), or as given: ``int64[4,16]:1000`` draws from
  ``[0, 1000)``;
- ``bool``: uniform over False and True.

Exit codes: 0 parity holds (``DIR`` written); 3 it does not (the table says where; ``DIR`` is
written all the same, to inspect); 2 a usage error (a module or callable that cannot be loaded,
a bad ``--input``, ``--init-args`` or ``--out``) or an op the port does not support (one line
listing every one with its torch source line), before anything is written.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import argparse

__all__ = ["port_parser", "run_port", "parse_input", "load_callable", "ParityFailed"]

_SPEC = re.compile(r"^\s*(\w+)\s*\[\s*([\d\s,]*)\]\s*(?::\s*(\d+)\s*)?$")
_FLOATS = ("float32", "float64", "float16", "bfloat16")
_INTS = ("int64", "int32", "uint8")


class ParityFailed(Exception):
    """The port's parity report did not hold; exit code 3."""


def port_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The ``port`` subcommand's flags."""
    import argparse

    p = sub.add_parser("port", help="port a PyTorch model to Flax NNX, check parity, write source + checkpoint",
                       formatter_class=argparse.RawDescriptionHelpFormatter, description=__doc__.split("\n\n")[0],
                       epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("target", metavar="MODULE:CALLABLE",
                   help="e.g. mypkg.nets:Net or path/to/nets.py:Net (a class or a function returning an nn.Module)")
    p.add_argument("--init-args", default="{}", help="JSON object of keyword arguments for CALLABLE")
    p.add_argument("--input", action="append", default=[], metavar="DTYPE[D0,D1,...]",
                   help="one per positional argument of forward, e.g. 'float32[8,1,28,28]', 'int64[4,16]:1000'")
    p.add_argument("--out", required=True, help="folder for the source, the checkpoint and config.yaml")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps compared (SGD with momentum, and Adam)")
    p.add_argument("--seed", type=int, default=0, help="draws the inputs and the report's labels or target")
    p.add_argument("--module-name", help="name of the generated module (default: from the torch class)")
    p.add_argument("--fit-loss", help="config.yaml's loss for jaxlight fit: multiclass | binary | regression | a dotted "
                                      "path (default: the report's loss, on {inputs, target} batches)")
    p.add_argument("--fit-data", help="config.yaml's data for jaxlight fit: a dotted path, or a YAML mapping "
                                      "{class_path: ..., init_args: {...}} (default: the example inputs, examples.npz)")
    p.add_argument("--verbose", action="store_true", help="print tracebacks to stderr")
    return p


def parse_input(spec: str, torch_module, generator):
    """One ``--input`` as a tensor (see the module docstring). Raises ``UsageError``."""
    import torch

    from jaxlight.commands import UsageError

    m = _SPEC.match(spec)
    if not m:
        raise UsageError(f"--input {spec!r}: expected DTYPE[D0,D1,...], e.g. float32[8,1,28,28] or int64[4,16]:1000")
    dtype_name, dims, high = m.group(1), m.group(2), m.group(3)
    shape = tuple(int(d) for d in dims.replace(" ", "").split(",") if d)
    if not shape or any(d < 1 for d in shape):
        raise UsageError(f"--input {spec!r}: give every dimension, each >= 1 (the first is the batch)")
    if dtype_name in _FLOATS:
        if high is not None:
            raise UsageError(f"--input {spec!r}: ':{high}' bounds integers only; floats are drawn standard normal")
        return torch.randn(shape, generator=generator).to(getattr(torch, dtype_name))
    if dtype_name == "bool":
        return torch.randint(0, 2, shape, generator=generator).bool()
    if dtype_name in _INTS:
        if high is None:
            sizes = [m.num_embeddings for m in torch_module.modules() if isinstance(m, (torch.nn.Embedding,
                                                                                          torch.nn.EmbeddingBag))]
            n = min(sizes) if sizes else (256 if dtype_name == "uint8" else 2)
        else:
            n = int(high)
            if n < 1:
                raise UsageError(f"--input {spec!r}: the bound must be >= 1")
        return torch.randint(0, n, shape, generator=generator).to(getattr(torch, dtype_name))
    raise UsageError(f"--input {spec!r}: unknown dtype {dtype_name!r}; choose one of "
                     f"{', '.join(_FLOATS + _INTS + ('bool',))}")


def load_callable(target: str):
    """The object ``MODULE:CALLABLE`` names; ``MODULE`` dotted or a ``.py`` path. Raises ``UsageError``."""
    import importlib
    import importlib.util

    from jaxlight.commands import UsageError

    module_part, sep, name = target.rpartition(":")
    if not sep or not module_part or not name:
        raise UsageError(f"{target!r}: expected MODULE:CALLABLE, e.g. mypkg.nets:Net or nets.py:Net")
    try:
        if module_part.endswith(".py") or os.sep in module_part:
            path = Path(module_part)
            if not path.is_file():
                raise UsageError(f"{target!r}: no such file {path}")
            folder = str(path.resolve().parent)
            if folder not in sys.path:
                sys.path.insert(0, folder)  # (its own imports of sibling files work, as under python path.py)
            mod_name = path.stem if path.stem not in sys.modules else f"_jaxlight_port_{path.stem}"
            spec = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[mod_name] = module
            spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.insert(0, os.getcwd())  # (as python -m would: a module beside you is found)
            module = importlib.import_module(module_part)
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's module failed to import: one line
        raise UsageError(f"{target!r}: importing {module_part} failed: {type(exc).__name__}: {exc}") from None
    obj = module
    for attr in name.split("."):
        if not hasattr(obj, attr):
            raise UsageError(f"{target!r}: {module_part} has no attribute {name!r}")
        obj = getattr(obj, attr)
    if not callable(obj):
        raise UsageError(f"{target!r}: {name} is a {type(obj).__name__}, not a class or function")
    return obj


def _build(target: str, init_args_json: str):
    import json

    import torch

    from jaxlight.commands import UsageError

    try:
        init_args = json.loads(init_args_json)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--init-args: not JSON ({exc})") from None
    if not isinstance(init_args, dict):
        raise UsageError(f"--init-args: expected a JSON object of keyword arguments, got {init_args_json!r}")
    factory = load_callable(target)
    try:
        module = factory(**init_args)
    except Exception as exc:  # noqa: BLE001 - the user's constructor refused its arguments
        raise UsageError(f"{target}(**{init_args}) raised {type(exc).__name__}: {exc}") from None
    if not isinstance(module, torch.nn.Module):
        raise UsageError(f"{target}(**{init_args}) returned a {type(module).__name__}, not a torch.nn.Module")
    return module


def _fit_data(value: str | None):
    """``--fit-data``: a dotted path, or a YAML mapping ``{class_path, init_args}``."""
    if value is None:
        return None
    import yaml

    from jaxlight.commands import UsageError

    try:
        spec = yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise UsageError(f"--fit-data: not a dotted path nor YAML ({str(exc).splitlines()[0]})") from None
    if isinstance(spec, str) and "." in spec:
        return spec
    if isinstance(spec, dict) and isinstance(spec.get("class_path"), str) and set(spec) <= {"class_path", "init_args"}:
        return spec
    raise UsageError(f"--fit-data {value!r}: expected a dotted path (mypkg.data.digits) or "
                     f"{{class_path: ..., init_args: {{...}}}}")


def run_port(args: argparse.Namespace):
    """Port, print the table, write ``--out``; raises :class:`ParityFailed` when parity does not hold."""
    from jaxlight.commands import UsageError, prepare_output_dir

    if not args.input:
        raise UsageError("give one --input per positional argument of forward, e.g. --input 'float32[8,1,28,28]'")
    if args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    out = prepare_output_dir(args.out, "--out")
    from jaxlight.checkpoint import list_checkpoints

    found = list_checkpoints(out)
    if found and not (out / "port.json").is_file():
        raise UsageError(f"--out {out} holds checkpoints ({found[-1].name}...) that no port wrote; choose another folder")
    data = _fit_data(args.fit_data)
    import torch

    import jaxlight.bridge.porting

    module = _build(args.target, args.init_args)
    generator = torch.Generator().manual_seed(args.seed)
    inputs = tuple(parse_input(spec, module, generator) for spec in args.input)
    try:
        ported = jaxlight.bridge.porting.port(module, inputs, steps=args.steps, seed=args.seed, module_name=args.module_name)
    except ValueError as exc:
        if isinstance(exc, jaxlight.bridge.porting.PortError):
            raise
        raise UsageError(str(exc)) from None
    print(ported.report, flush=True)
    folder = ported.save(out, loss=args.fit_loss, data=data)
    print(f"wrote {folder}: {ported.translation.module_name}.py, {list_checkpoints(folder)[-1].name}/, config.yaml "
          f"(fine-tune: PYTHONPATH={folder} jaxlight fit --config {folder / 'config.yaml'})", flush=True)
    if not ported.report.ok:
        raise ParityFailed(f"parity does not hold: first difference at {ported.report.first_difference} "
                           f"(the table above; written to {folder} all the same)")
    return ported
