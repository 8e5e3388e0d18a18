"""``Port.save(folder)``: a port as files another process loads, fine-tunes and serves.

::

    folder/<module>.py        the generated NNX source (importable; the class named after the torch class)
    folder/step_000000000/    a jaxlight checkpoint of the ported weights (jaxlight.checkpoint, with its
                              sha256 manifest); its record names model.class_path "<module>.<Class>"
    folder/config.yaml        a `jaxlight fit --config` run that starts from those weights
    folder/examples.npz       the example inputs and targets (the config's default data)
    folder/port.json          what was ported: the torch class, the class path, whether parity held
    folder/report.txt         the parity table (when the port was checked)

Loading runs no code saved with a checkpoint unless the caller says so:
``jaxlight.load_from_checkpoint(folder, trust_code=True)`` imports ``folder/<module>.py``.
``jaxlight fit --config folder/config.yaml`` imports the model by its class path, so the folder
must be on the import path (``PYTHONPATH=folder``), as any model package must be.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

__all__ = ["write_port", "port_config"]

MARKER = "port.json"


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _spec(value, key: str) -> dict:
    if isinstance(value, str):
        return {"class_path": value, "init_args": {}}
    if isinstance(value, dict) and isinstance(value.get("class_path"), str):
        return {"class_path": value["class_path"], "init_args": dict(value.get("init_args") or {})}
    raise ValueError(f"{key}: expected a dotted path or {{class_path, init_args}}, got {value!r}")


def port_config(port, folder: Path, *, loss=None, data=None, optimizer=None, max_epochs: int = 1,
                batch_size: int | None = None, seed: int = 0) -> dict:
    """The ``jaxlight fit`` config of a port saved in ``folder`` (absolute paths, so that it runs
    from any working directory): the ported class, ``init: {checkpoint: folder}`` (the ported
    weights), the report's loss and the saved examples unless others are given, Adam."""
    from jaxlight.porting.task import LOSSES, batch_first

    t = port.translation
    if loss is None:
        if port.loss_kind is None:
            raise ValueError("Port.save: the report used your own loss; name it for the config: "
                             "save(folder, loss='mypkg.losses.loss_fn') (a dotted path to loss_fn(model, batch))")
        whole = not batch_first({"inputs": tuple(port.example_inputs), "target": port.targets})
        loss = LOSSES[port.loss_kind + ("_whole" if whole else "")][2]
    examples = {"inputs": tuple(port.example_inputs), "target": port.targets}
    batch = int(port.example_inputs[0].shape[0]) if batch_first(examples) else 1
    return {
        "seed": int(seed),
        "model": {"class_path": f"{t.module_name}.{t.class_name}", "init_args": dict(t.init_args or {})},
        "init": {"checkpoint": str(folder)},
        "loss": loss,
        "data": _spec(data, "data") if data is not None else {
            "class_path": "jaxlight.porting.task.example_data", "init_args": {"path": str(folder / "examples.npz")}},
        "optimizer": _spec(optimizer, "optimizer") if optimizer is not None else {
            "class_path": "optax.adam", "init_args": {"learning_rate": 1.0e-3}},
        "trainer": {"max_epochs": int(max_epochs), "batch_size": int(batch_size or batch),
                    "out": str(folder / "finetune"), "checkpoint": {"dirpath": str(folder / "finetune" / "ckpt")}},
    }


def _clear(folder: Path) -> None:
    """Before writing into ``folder``: refuse one holding checkpoints that no port wrote; remove
    the checkpoint of an earlier port there (it is replaced)."""
    from jaxlight.checkpoint import list_checkpoints

    found = list_checkpoints(folder)
    if not found:
        return
    if not (folder / MARKER).is_file():
        raise FileExistsError(f"{folder} holds checkpoints ({found[-1].name}...) that no port wrote; save the port "
                              f"into an empty folder")
    for path in found:
        shutil.rmtree(path)


def write_port(port, folder, *, loss=None, data=None, optimizer=None, max_epochs: int = 1,
               batch_size: int | None = None, seed: int = 0) -> Path:
    """Write ``port`` into ``folder`` (see the module docstring); returns the folder."""
    import yaml

    from jaxlight.checkpoint import save_checkpoint
    from jaxlight.hparams import import_path, run_record
    from jaxlight.porting.task import write_examples
    from jaxlight.state import create_train_state

    folder = Path(folder).absolute()
    folder.mkdir(parents=True, exist_ok=True)
    config = port_config(port, folder, loss=loss, data=data, optimizer=optimizer, max_epochs=max_epochs,
                         batch_size=batch_size, seed=seed)
    _clear(folder)
    t = port.translation
    _write_text(folder / f"{t.module_name}.py", t.source)
    write_examples(folder / "examples.npz", port.example_inputs, port.targets)
    _write_text(folder / "config.yaml", yaml.safe_dump(config, sort_keys=False, default_flow_style=False))

    # The checkpoint: the ported model in a TrainState of the config's optimizer (a fresh state at
    # step 0), written by the shipped checkpoint code, recording the config as a fit would.
    opt = config["optimizer"]
    tx = import_path(opt["class_path"])(**opt["init_args"])
    state = create_train_state(port.model, tx, port.loss[0], seed)
    save_checkpoint(folder, state, {"epoch": 0, "batch": 0, "hparams": run_record(config, state)})

    torch_cls = type(port.torch_module)
    info = {"torch_class": f"{torch_cls.__module__}.{torch_cls.__qualname__}",
            "class_path": config["model"]["class_path"], "init_args": config["model"]["init_args"],
            "inputs": [{"shape": list(x.shape), "dtype": str(x.dtype)} for x in port.example_inputs],
            "loss": config["loss"], "parity": None if port.report is None else bool(port.report.ok)}
    if port.report is not None:
        _write_text(folder / "report.txt", str(port.report) + "\n")
    _write_text(folder / MARKER, json.dumps(info, indent=2) + "\n")
    return folder

