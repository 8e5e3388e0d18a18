"""The ways to train one model, behind one timing interface.

Every variant trains the same model (``jaxlight.models`` / ``torch_ref.models``, PyTorch's
initialisation) with Adam at the recipe's learning rate on MNIST, batch ``B``:

| name | what runs |
| --- | --- |
| ``jax_fused`` | ``jaxlight.loop.fit`` on device data, default K (an epoch in one compiled program) |
| ``jax_step`` | ``jaxlight.loop.fit(steps_per_call=1)``: one compiled call per batch from the host loop |
| ``jax_trainer`` | ``jaxlight.trainer.Trainer.fit`` (skipped with the reason when it is not installed) |
| ``torch_dataloader`` | the tutorial: ``DataLoader(torchvision.datasets.MNIST(ToTensor()), shuffle=True)`` |
| ``torch_memory`` | in-memory float tensors, batches by index (``torch_ref.data.MemoryLoader``'s way) |
| ``torch_compile`` | ``torch_memory`` with ``torch.compile(model)`` |
| ``lightning`` | PyTorch Lightning's ``Trainer.fit`` on the ``torch_ref`` model, in-memory ``DataLoader`` |
| ``jax_ported`` | ``jax_fused`` on the port (``jaxlight.port``) of the torch model the torch variants train |

A ported model (``Context.torch_factory``, ``benchmarks.run --ported MODULE:CALLABLE``) takes the
place of the built-in one: the torch variants train the torch module, the jaxlight variants its
port. In a built-in model's group, ``jax_ported`` beside ``jax_fused`` times the port of
``torch_ref``'s twin against the hand-written model (``x fused``).

Interface: ``v = make(name, ctx)``; ``v.accuracy()`` is the test accuracy now. jaxlight's
variants are timed as their users run them, in whole epochs: ``v.run_epoch()`` trains one epoch
through the library's entry point and returns its synchronised seconds (the first includes
compilation). The torch variants are timed in windows of steps: ``v.run(steps)`` returns the
synchronised wall time of ``steps`` steps (the first call includes any compilation). A variant
that cannot run here raises :class:`Skip` with the reason.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

__all__ = ["VARIANTS", "Skip", "Context", "make"]

VARIANTS = ("jax_fused", "jax_step", "jax_trainer", "torch_dataloader", "torch_memory",
            "torch_compile", "lightning", "jax_ported")


class Skip(Exception):
    """This variant cannot run here; the message says why (recorded in the results)."""


@dataclass
class Context:
    """What every variant needs: the model, batch size, learning rate and the data.

    ``train_x (N, 28, 28) uint8`` (or the ported module's per-example shape), ``train_y (N,)
    int32``, the same for test; ``data_dir`` is where torchvision finds ``MNIST/raw`` for the
    tutorial's loader; ``seed`` fixes weights and order. ``torch_factory``: ``seed -> torch
    module`` of a ported model (None: the built-in ``model``).
    """

    model: str
    batch_size: int
    lr: float
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    data_dir: str | None = None
    seed: int = 0
    torch_factory: object = None

    @property
    def num_batches(self) -> int:
        return -(-len(self.train_y) // self.batch_size)


def torch_model(ctx: Context):
    """The torch module of the group: the ported one, or ``torch_ref``'s built-in twin."""
    import torch_ref.models

    return ctx.torch_factory(ctx.seed) if ctx.torch_factory is not None else torch_ref.models.build_model(ctx.model,
                                                                                                           ctx.seed)


def ported_model(ctx: Context):
    """The port (``jaxlight.port``, its report skipped) of :func:`torch_model`, traced on one
    batch of the training images as the torch variants feed them (``/ 255``)."""
    import torch

    from jaxlight.bridge.porting import port

    x = torch.from_numpy(ctx.train_x[:ctx.batch_size]).float().div(255)
    return port(torch_model(ctx), (x,), check=False).model


# -- jaxlight -----------------------------------------------------------------------------------

class _JaxEpochs:
    """jaxlight as its users run it, timed in whole epochs: ``run_epoch()`` trains one more
    epoch through the library's own entry point and returns its synchronised seconds. The
    first call compiles (the harness reports it apart); later ones are steady epochs.

    Time to accuracy (``fit_to_accuracy``) drives the library's epoch runner
    (``jaxlight.loop.EpochRunner``, what ``loop.fit`` iterates) and evaluates between its
    chunks with the clock paused.
    """

    steps_per_call: int | None = None  # K; None: the library's default (the whole epoch, mostly)
    ported = False  # True: the port of the torch model, not the hand-written jaxlight model

    def __init__(self, ctx: Context):
        import jax
        from jaxlight import ArrayDataset, build_model, create_train_state, make_optimizer, tasks

        self.jax, self.ctx = jax, ctx
        model = ported_model(ctx) if self.ported or ctx.torch_factory is not None else build_model(ctx.model, ctx.seed)
        self.state = create_train_state(model, make_optimizer("adam", ctx.lr), tasks.multiclass(), ctx.seed)
        self.train = ArrayDataset(ctx.train_x, ctx.train_y).to_device()
        self.test = ArrayDataset(ctx.test_x, ctx.test_y).to_device()

    def accuracy(self) -> float:
        from jaxlight.loop import evaluate

        return evaluate(self.state, self.test)["accuracy"]

    def _check_epoch(self, done: int) -> None:
        if int(self.state.step) != done + self.ctx.num_batches:
            raise RuntimeError(f"{type(self).__name__} ran {int(self.state.step) - done} steps in an epoch of "
                               f"{self.ctx.num_batches}")

    def run_epoch(self) -> float:
        """One ``loop.fit`` epoch: ``EpochResult.seconds`` (the epoch's chunks and its metrics,
        synchronised; ``fit``'s one-off data check before the first epoch is not in it)."""
        from jaxlight import loop

        done = int(self.state.step)
        self.state, history = loop.fit(self.state, self.train, epochs=1, batch_size=self.ctx.batch_size,
                                       steps_per_call=self.steps_per_call)
        self._check_epoch(done)
        return history[-1].seconds

    def fit_to_accuracy(self, target: float, max_epochs: float, every: int, max_seconds: float | None,
                        t0: float) -> dict:
        """Train until the test accuracy, measured every ``every`` steps and at epoch ends with
        the clock paused, reaches ``target``. ``t0``: when the clock started (before the variant
        was built, so compilation counts). Returns what ``benchmarks.tta.time_to_accuracy`` does."""
        from jaxlight.loop import EpochRunner
        from jaxlight.parallel import get_strategy
        from jaxlight.step import default_steps_per_call, needs_unroll

        nb, strategy = self.ctx.num_batches, get_strategy(None)
        k = min(self.steps_per_call or default_steps_per_call(self.state, nb), every)
        state = strategy.prepare_state(self.state)
        paused, curve, steps, reached, chunk_seconds = 0.0, [], 0, None, []
        last, done, epoch = time.perf_counter(), False, 0
        while not done:
            runner = EpochRunner(state, self.train, epoch, self.ctx.batch_size, strategy, k,
                                 unroll=k > 1 and needs_unroll(state))
            for state, metrics, n in runner:
                steps += n
                if steps % every and runner.position < nb:  # evaluate every `every` steps and at epoch ends
                    continue
                self.jax.block_until_ready(metrics)
                now = time.perf_counter()
                chunk_seconds.append(now - last)
                elapsed = now - t0 - paused  # training time so far: earlier evaluations excluded
                self.state = state
                acc = self.accuracy()
                curve.append([elapsed, steps, acc])
                reached = elapsed if acc >= target else None
                done = (reached is not None or steps >= max_epochs * nb
                        or (max_seconds is not None and elapsed > max_seconds))
                if done:
                    break
                last = time.perf_counter()
                paused += last - now
            epoch += 1
        typical = sorted(chunk_seconds[1:])[len(chunk_seconds[1:]) // 2] if len(chunk_seconds) > 1 else 0.0
        compile_s = max(0.0, chunk_seconds[0] - typical) + (curve[0][0] - chunk_seconds[0] if curve else 0.0)
        return {"reached": reached is not None, "seconds": reached, "compile_s": compile_s,
                "train_s": None if reached is None else reached - compile_s, "steps": steps, "epochs": steps / nb,
                "chunk_seconds": chunk_seconds, "curve": curve}


class JaxFused(_JaxEpochs):
    """``jaxlight.loop.fit`` on an ``ArrayDataset`` on the device, the default K (the whole
    epoch in one compiled program, except where ``default_steps_per_call`` says otherwise)."""


class JaxPorted(_JaxEpochs):
    """``jax_fused`` on the port of the group's torch model (:func:`ported_model`): beside
    ``jax_fused`` in a built-in model's group, the port against the hand-written model."""

    ported = True


class JaxStep(_JaxEpochs):
    """``jaxlight.loop.fit(..., steps_per_call=1)``: one compiled call per batch from the host
    loop (the batch still gathered on the device)."""

    steps_per_call = 1


class JaxTrainer(_JaxEpochs):
    """``jaxlight.trainer.Trainer.fit``, one epoch per call (no validation, no progress bar), timed
    from its ``on_fit_start`` to its ``on_epoch_end`` (synchronised): the epoch with every hook,
    NaN check and metric reduction, without ``fit``'s one-off data check and device transfer."""

    def __init__(self, ctx: Context):
        try:
            from jaxlight.callbacks import Callback
            from jaxlight.trainer import Trainer, TrainerConfig
        except ImportError as exc:
            raise Skip(f"jaxlight.trainer is not in this checkout ({exc})") from None
        super().__init__(ctx)
        self.Trainer, self.TrainerConfig, self.Callback = Trainer, TrainerConfig, Callback

    def _config(self, **kw):
        return self.TrainerConfig(batch_size=self.ctx.batch_size, val_every_n_epochs=None, handle_sigterm=False, **kw,
                                  logging={"enable_progress_bar": False})

    def run_epoch(self) -> float:
        jax = self.jax

        class EpochClock(self.Callback):
            def on_fit_start(self, trainer, state):
                self.start = time.perf_counter()

            def on_epoch_end(self, trainer, state, metrics):
                jax.block_until_ready(state.params)
                self.seconds = time.perf_counter() - self.start

        clock, done = EpochClock(), int(self.state.step)
        epochs = done // self.ctx.num_batches + 1  # fit continues at epoch step // steps_per_epoch
        self.state = self.Trainer(self._config(max_epochs=epochs), callbacks=[clock]).fit(self.state, self.train)
        self._check_epoch(done)
        return clock.seconds

    def fit_to_accuracy(self, target: float, max_epochs: float, every: int, max_seconds: float | None,
                        t0: float) -> dict:
        """One ``Trainer.fit`` whose callback evaluates every ``every`` steps (clock paused) and
        stops it at ``target``."""
        variant, nb = self, self.ctx.num_batches

        class Eval(self.Callback):
            def __init__(self):
                self.paused, self.curve, self.reached, self.chunk_seconds = 0.0, [], None, []
                self.last = None

            def on_fit_start(self, trainer, state):
                self.last = time.perf_counter()

            def on_train_chunk_end(self, trainer, state, metrics):
                if trainer.global_step % every and trainer.batch < nb:
                    return
                now = time.perf_counter()
                self.chunk_seconds.append(now - self.last)
                elapsed = now - t0 - self.paused
                variant.state = state
                acc = variant.accuracy()
                self.curve.append([elapsed, trainer.global_step, acc])
                if acc >= target:
                    self.reached = elapsed
                    trainer.should_stop = True
                elif max_seconds is not None and elapsed > max_seconds:
                    trainer.should_stop = True
                self.last = time.perf_counter()
                self.paused += self.last - now

        cb = Eval()
        self.state = self.Trainer(self._config(max_epochs=math.ceil(max_epochs), max_steps=int(max_epochs * nb),
                                               steps_per_execution=every), callbacks=[cb]).fit(self.state, self.train)
        steps = cb.curve[-1][1] if cb.curve else 0
        typical = sorted(cb.chunk_seconds[1:])[len(cb.chunk_seconds[1:]) // 2] if len(cb.chunk_seconds) > 1 else 0.0
        compile_s = max(0.0, cb.chunk_seconds[0] - typical) + (cb.curve[0][0] - cb.chunk_seconds[0] if cb.curve else 0.0)
        return {"reached": cb.reached is not None, "seconds": cb.reached, "compile_s": compile_s,
                "train_s": None if cb.reached is None else cb.reached - compile_s, "steps": steps, "epochs": steps / nb,
                "chunk_seconds": cb.chunk_seconds, "curve": cb.curve}


# -- torch --------------------------------------------------------------------------------------

class _Torch:
    def __init__(self, ctx: Context):
        import torch

        self.torch, self.ctx = torch, ctx
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = torch_model(ctx).to(self.device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=ctx.lr)
        self.net = self.model
        self.gen = torch.Generator().manual_seed(ctx.seed)
        self.test_x = torch.from_numpy(ctx.test_x).float().div(255).to(self.device)
        self.test_y = torch.from_numpy(ctx.test_y.astype(np.int64)).to(self.device)

    def _step(self, x, y):
        self.opt.zero_grad()
        loss = self.torch.nn.functional.cross_entropy(self.net(x), y)
        loss.backward()
        self.opt.step()
        return loss

    def _sync(self, loss):
        if self.device == "cuda":
            self.torch.cuda.synchronize()
        else:
            loss.item()

    def accuracy(self) -> float:
        torch = self.torch
        self.model.eval()
        with torch.no_grad():
            correct = sum(int((self.model(self.test_x[i:i + 1000]).argmax(-1) == self.test_y[i:i + 1000]).sum())
                          for i in range(0, len(self.test_y), 1000))
        self.model.train()
        return correct / len(self.test_y)


class TorchMemory(_Torch):
    """Float tensors (``/ 255`` once) on the device, shuffled with ``randperm`` each epoch."""

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        torch = self.torch
        self.x = torch.from_numpy(ctx.train_x).float().div(255).to(self.device)
        self.y = torch.from_numpy(ctx.train_y.astype(np.int64)).to(self.device)
        self.batches = iter(())

    drop_partial = False  # TorchCompile drops the shorter last batch

    def _epoch(self):
        perm = self.torch.randperm(len(self.y), generator=self.gen).to(self.device)
        B = self.ctx.batch_size
        return (perm[i:i + B] for i in range(0, len(perm), B))

    def run(self, steps: int) -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            keep = next(self.batches, None)
            if keep is None or (self.drop_partial and len(keep) < self.ctx.batch_size):
                self.batches = self._epoch()
                keep = next(self.batches)
            loss = self._step(self.x[keep], self.y[keep])
        self._sync(loss)
        return time.perf_counter() - t0


class TorchCompile(TorchMemory):
    """``torch.compile(model)`` (default mode, static shapes) on the in-memory batches."""

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        self.net = self.torch.compile(self.model)

    # The last partial batch would trigger a recompilation for a new shape: drop it here
    # (timing only; this variant is not used for time to accuracy).
    drop_partial = True


class TorchDataLoader(_Torch):
    """The tutorial, as written: one PIL image per example through ``ToTensor``, collated per step."""

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        from torch_ref.data import _tutorial_mnist, torchvision_root

        dataset = _tutorial_mnist(torchvision_root(ctx.data_dir), True, False)
        self.loader = self.torch.utils.data.DataLoader(dataset, batch_size=ctx.batch_size, shuffle=True,
                                                       generator=self.gen)
        self.batches = iter(())

    def run(self, steps: int) -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            batch = next(self.batches, None)
            if batch is None:
                self.batches = iter(self.loader)
                batch = next(self.batches)
            x, y = batch
            loss = self._step(x.to(self.device), y.to(self.device))
        self._sync(loss)
        return time.perf_counter() - t0


class Lightning(_Torch):
    """``lightning.Trainer(max_steps=steps + 1).fit`` per call; the time is measured inside the
    fit, from the end of its first batch to the end of its last (a callback's timestamps), so
    the Trainer's per-fit setup is not counted but every per-step hook is."""

    def __init__(self, ctx: Context):
        try:
            import lightning as L
        except ImportError as exc:
            raise Skip(f"lightning is not installed ({exc})") from None
        super().__init__(ctx)
        torch = self.torch
        self.L = L
        x = torch.from_numpy(ctx.train_x).float().div(255)
        y = torch.from_numpy(ctx.train_y.astype(np.int64))
        self.loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=ctx.batch_size,
                                                  shuffle=True, generator=self.gen)
        model, lr, F = self.model, ctx.lr, torch.nn.functional

        class Module(L.LightningModule):
            def __init__(self):
                super().__init__()
                self.net = model

            def training_step(self, batch, batch_idx):
                x, y = batch
                return F.cross_entropy(self.net(x), y)

            def configure_optimizers(self):
                return torch.optim.Adam(self.net.parameters(), lr=lr)

        class Clock(L.Callback):
            def __init__(self):
                self.stamps = []

            def on_train_batch_end(self, trainer, *args):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.stamps.append(time.perf_counter())

        self.module, self.Clock = Module(), Clock
        self.first = True

    def run(self, steps: int) -> float:
        import logging
        import warnings

        logging.getLogger("lightning").setLevel(logging.ERROR)
        logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
        clock = self.Clock()
        trainer = self.L.Trainer(max_steps=steps + 1, accelerator="gpu" if self.device == "cuda" else "cpu",
                                 devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                 enable_model_summary=False, callbacks=[clock], num_sanity_val_steps=0)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(self.module, self.loader)
        if len(clock.stamps) != steps + 1:
            raise RuntimeError(f"lightning ran {len(clock.stamps)} steps, asked for {steps + 1}")
        if self.first:  # the warm-up call: everything from Trainer() to the last step
            self.first = False
            return clock.stamps[-1] - t0
        return clock.stamps[-1] - clock.stamps[0]

    def fit_to_accuracy(self, target: float, max_epochs: float, every: int, max_seconds: float | None,
                        t0: float) -> dict:
        """Time to accuracy as a Lightning user gets it: one ``Trainer.fit``, the test accuracy
        measured every ``every`` batches by a callback that pauses the clock while it evaluates
        and stops the fit once ``target`` is reached. ``t0``: when the clock started (before
        the variant was built). Returns what ``benchmarks.tta.time_to_accuracy`` returns."""
        import logging
        import warnings

        logging.getLogger("lightning").setLevel(logging.ERROR)
        logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
        variant, nb = self, self.ctx.num_batches
        first_batch = {}

        class Eval(self.L.Callback):
            def __init__(self):
                self.paused, self.curve, self.steps, self.reached = 0.0, [], 0, None

            def on_train_batch_end(self, trainer, *args):
                self.steps += 1
                first_batch.setdefault("t", time.perf_counter())
                if self.steps % every and self.steps % nb:  # evaluate every `every` and at epoch ends
                    return
                now = time.perf_counter()
                elapsed = now - t0 - self.paused  # training time so far: earlier evaluations excluded
                acc = variant.accuracy()
                self.paused += time.perf_counter() - now
                self.curve.append([elapsed, self.steps, acc])
                if acc >= target:
                    self.reached = elapsed
                    trainer.should_stop = True
                elif max_seconds is not None and elapsed > max_seconds:
                    trainer.should_stop = True

        cb = Eval()
        trainer = self.L.Trainer(max_steps=int(max_epochs * nb), accelerator="gpu" if self.device == "cuda" else "cpu",
                                 devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                 enable_model_summary=False, callbacks=[cb], num_sanity_val_steps=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(self.module, self.loader)
        # Compilation has no analogue here; Trainer setup up to the first batch is the "compile" share.
        compile_s = first_batch.get("t", t0) - t0
        return {"reached": cb.reached is not None, "seconds": cb.reached, "compile_s": compile_s,
                "train_s": None if cb.reached is None else cb.reached - compile_s, "steps": cb.steps,
                "epochs": cb.steps / nb, "curve": cb.curve}


_CLASSES = {"jax_fused": JaxFused, "jax_step": JaxStep, "jax_trainer": JaxTrainer,
            "torch_dataloader": TorchDataLoader, "torch_memory": TorchMemory, "torch_compile": TorchCompile,
            "lightning": Lightning, "jax_ported": JaxPorted}


def make(name: str, ctx: Context):
    """A fresh variant (fresh weights from ``ctx.seed``). Raises :class:`Skip` when unavailable."""
    if name not in _CLASSES:
        raise ValueError(f"unknown variant {name!r}; choose from {VARIANTS}")
    return _CLASSES[name](ctx)
