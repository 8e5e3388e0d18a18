"""``jaxlight.bridge.porting``: bring a PyTorch model (``jaxlight.port(torch_module, inputs)``). Its Flax NNX twin as readable source, the weights
moved exactly, and the proof that both compute the same thing.

    >>> import jaxlight, torch
    >>> torch_net = torch.nn.Sequential(torch.nn.Linear(6, 3), torch.nn.Tanh())
    >>> p = jaxlight.port(torch_net, (torch.randn(8, 6),), check=False)   # check=True adds p.report
    >>> p.model(torch.randn(2, 6).numpy()).shape     # the nnx.Module, holding torch_net's weights
    (2, 3)
    >>> "class Sequential(nn.Sequential):" in p.source   # the NNX class(es), one attribute per torch submodule
    True

``print(p.report)`` prints the parity table (forward, gradients, SGD and Adam steps against
torch) and ``p.save("ported/")`` writes the source, a checkpoint and a ``config.yaml`` for
``jaxlight fit``.

The parts, one job each:

- :mod:`jaxlight.bridge.porting.translate`: the torch module -> NNX source, the model built from it, the
  conversion layout (``translate()``; refuses what it cannot port with :class:`UnsupportedError`);
- :mod:`jaxlight.bridge.porting.report`: the parity report, run through ``jaxlight.bridge.parity.check_parity``
  (the shipped engine: ``EpochRunner``'s steps, ``apply_grads``);
- :mod:`jaxlight.bridge.porting.task`: the default losses a report and a fine-tuning config use, and the
  example data saved beside a port;
- :mod:`jaxlight.bridge.porting.cli`: ``jaxlight port MODULE:CALLABLE --input ... --out DIR``.

``jaxlight.port`` is :func:`port`, exported from here; the package has its own name so that
importing ``jaxlight.bridge.porting.nn`` (what generated source does) never rebinds ``jaxlight.port``.
Importing this package loads neither torch nor JAX; :func:`port` needs torch (the ``torch``
extra).
"""

from __future__ import annotations

import importlib
from pathlib import Path

__all__ = ["Port", "PortError", "PortReport", "UnsupportedError", "port"]

_LAZY = {"PortError": "jaxlight.bridge.porting.translate", "UnsupportedError": "jaxlight.bridge.porting.translate",
         "PortReport": "jaxlight.bridge.porting.report", "Translation": "jaxlight.bridge.porting.translate"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'jaxlight.bridge.porting' has no attribute {name!r}")


class Port:
    """A ported model: what :func:`port` returns.

    Attributes:
        torch_module: the torch module it was ported from.
        model: the ``nnx.Module`` built from :attr:`source`, holding the torch module's
            parameters and buffers converted exactly (permutations only), in train mode.
        source: the Python source of the NNX module class(es).
        report: the parity report (:class:`jaxlight.bridge.porting.report.PortReport`): ``.ok``, and
            ``str(report)`` is the table. None when ``port(..., check=False)``.
        translation: what ``jaxlight.bridge.porting.translate.translate`` returned (``layout``: every
            torch ``state_dict`` key -> NNX path and permutation; ``module_name``,
            ``class_name``, ``init_args``).
        example_inputs: the example inputs, as numpy arrays.
        targets: the targets the report's loss used (see :mod:`jaxlight.bridge.porting.task`).
        loss: ``(jax loss_fn, torch loss_fn)`` the report used.
    """

    def __init__(self, torch_module, translation, report, example_inputs: tuple, targets, loss: tuple,
                 loss_kind: str | None):
        self.torch_module = torch_module
        self.translation = translation
        self.report = report
        self.example_inputs = example_inputs
        self.targets = targets
        self.loss = loss
        self.loss_kind = loss_kind  # "cross_entropy", "mse" (the defaults) or None (the user's)

    @property
    def model(self):
        return self.translation.model

    @property
    def source(self) -> str:
        return self.translation.source

    @property
    def layout(self):
        return self.translation.layout

    @property
    def class_path(self) -> str:
        """``"<module_name>.<class_name>"``: what a checkpoint of the port records."""
        return f"{self.translation.module_name}.{self.translation.class_name}"

    def save(self, folder, *, loss: str | None = None, data: dict | str | None = None, optimizer: dict | None = None,
             max_epochs: int = 1, batch_size: int | None = None, seed: int = 0) -> Path:
        """Write the port to ``folder`` so that another process can load, fine-tune and serve it.

        ``folder/<module_name>.py`` (the source), ``folder/step_000000000/`` (a jaxlight
        checkpoint of :attr:`model`, recording ``class_path`` ``<module_name>.<class_name>`` and
        its ``init_args``), ``folder/examples.npz`` (the example inputs and targets) and
        ``folder/config.yaml``: a ``jaxlight fit --config`` run that starts from the ported
        weights (``init: {checkpoint: folder}``). See :mod:`jaxlight.bridge.porting.save`.

        Args:
            folder: created if missing; must not hold another checkpoint.
            loss: the config's ``loss`` (a built-in task name or a dotted path to
                ``loss_fn(model, batch)``); default: the report's loss when it was a default
                one (``jaxlight.bridge.porting.task.cross_entropy`` / ``mse``).
            data: the config's ``data`` (a dotted path or ``{class_path, init_args}``); default:
                ``jaxlight.bridge.porting.task.example_data`` on ``folder/examples.npz``.
            optimizer: the config's ``optimizer`` (default ``optax.adam``, learning rate 1e-3).
            max_epochs, batch_size, seed: the config's ``trainer.max_epochs``,
                ``trainer.batch_size`` (default: the examples' batch) and ``seed``.

        Returns:
            ``folder`` as a ``Path``.

        Loading in a fresh process: ``jaxlight.load_from_checkpoint(folder, trust_code=True)``
        (the generated module lies in the checkpoint's folder, so loading runs code saved with
        the checkpoint only when you say so).
        """
        from jaxlight.bridge.porting.save import write_port

        return write_port(self, folder, loss=loss, data=data, optimizer=optimizer, max_epochs=max_epochs,
                          batch_size=batch_size, seed=seed)

    def __repr__(self) -> str:
        status = "no report" if self.report is None else ("parity OK" if self.report.ok else "parity FAILED")
        return f"Port({self.class_path}, {status})"


def port(torch_module, example_inputs, *, loss: tuple | None = None, targets=None, steps: int = 3,
         tolerances: dict | None = None, module_name: str | None = None, seed: int = 0, check: bool = True) -> Port:
    """Port a ``torch.nn.Module`` to Flax NNX and prove the port computes what it computes.

    Args:
        torch_module: the model; it is not modified (the report trains copies).
        example_inputs: a tuple of torch tensors (a single tensor is taken as a 1-tuple), the
            positional arguments of ``forward``; every one batch-first with the same batch size
            ``B``. They are traced through ``forward`` and are the report's batch.
        loss: ``(loss_fn, torch_loss_fn)``, jaxlight's loss contract on both sides:
            ``loss_fn(model, batch) -> (losses (B,), metrics)`` with ``batch = {"inputs": (x,
            ...), "target": y}`` (``torch_loss_fn`` the same on tensors). Default: cross-entropy
            against labels drawn from ``seed`` for a classifier's output ``(B, C)``, else the mean
            squared error to a fixed random target (:mod:`jaxlight.bridge.porting.task`).
        targets: the batch's ``"target"`` for your ``loss`` (numpy or torch, leading axis ``B``);
            default: the drawn labels or target.
        steps: optimizer steps compared, for SGD with momentum and for Adam each.
        tolerances: overrides of ``jaxlight.bridge.parity.DEFAULT_TOLERANCES``, by level.
        module_name: the generated module's name (default: from the torch class).
        seed: the labels' and targets' draw.
        check: False skips the report (``Port.report`` is None): the translation alone.

    Returns:
        A :class:`Port`.

    Raises:
        UnsupportedError: an op or construct that cannot be ported; one message listing each
            with the torch source line it comes from, raised before anything is generated.
        ValueError: example inputs that are not tensors or do not share a batch axis.
    """
    from jaxlight.bridge.porting import report as report_mod
    from jaxlight.bridge.porting.translate import translate

    inputs = report_mod.as_input_tuple(example_inputs)
    translation = translate(torch_module, inputs, module_name=module_name)
    arrays = tuple(report_mod.to_numpy(x) for x in inputs)
    loss_pair, target, kind = report_mod.resolve_loss(torch_module, inputs, loss, targets, seed)
    report = None
    if check:
        report = report_mod.check_port(torch_module, translation, arrays, target, loss_pair, steps=steps,
                                       tolerances=tolerances, loss_kind=kind)
    return Port(torch_module, translation, report, arrays, target, loss_pair, kind)

