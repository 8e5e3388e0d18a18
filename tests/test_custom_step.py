"""A train step of your own (create_train_state(..., step_fn=...)) runs through the one engine:
loop.fit's fused and streamed epochs, the Trainer, checkpoints with exact resume, every
strategy. The step is docs/examples/gan.py's (two optimizers, alternating updates), and the
reference a two-optimizer GAN loop written here in plain jax and optax."""

import importlib.util
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxlight
from jaxlight import loop, parallel
from jaxlight.callbacks import ModelCheckpoint
from jaxlight.data import batch_indices
from jaxlight.step import BatchError
from jaxlight.trainer import Trainer, TrainerConfig
from _support import PARALLEL_ATOL, PARALLEL_RTOL, ROOT

N, B = 128, 32  # 4 whole batches an epoch


def _example():
    spec = importlib.util.spec_from_file_location("example_gan", ROOT / "docs" / "examples" / "gan.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


gan = _example()


def _params(state):
    """{"generator": [(kernel, bias), ...], "discriminator": [...]} as numpy."""
    p = parallel.to_host_state(state).params
    return {part: [(np.array(layer["kernel"][...]), np.array(layer["bias"][...])) for _, layer in
                   sorted(p[part]["layers"].items())] for part in ("generator", "discriminator")}


def reference(state, data, epochs):
    """The GAN loop by hand: plain jax and optax on lists of (kernel, bias), one Adam per
    network; each batch updates the discriminator, then the generator against the updated
    discriminator; noise drawn from fold_in(state.key, step); batches in the order
    ``batch_indices`` gives (the data order, tested in tests/data/test_arrays.py)."""
    params = _params(state)
    g, d = params["generator"], params["discriminator"]
    g_tx, d_tx = optax.adam(2e-3, b1=0.5), optax.adam(2e-3, b1=0.5)
    g_opt, d_opt = g_tx.init(g), d_tx.init(d)
    x_all = jnp.asarray(data.data["x"])

    def mlp(layers, x):
        for kernel, bias in layers[:-1]:
            x = jnp.maximum(x @ kernel + bias, 0.0)
        kernel, bias = layers[-1]
        return x @ kernel + bias

    def d_loss(d, g, x, z):
        real, fake = mlp(d, x)[:, 0], mlp(d, mlp(g, z))[:, 0]
        return jnp.mean(jax.nn.softplus(-real) + jax.nn.softplus(fake))

    def g_loss(g, d, z):
        return jnp.mean(jax.nn.softplus(-mlp(d, mlp(g, z))[:, 0]))

    @jax.jit
    def step(g, d, g_opt, d_opt, x, z):
        updates, d_opt = d_tx.update(jax.grad(d_loss)(d, g, x, z), d_opt, d)
        d = optax.apply_updates(d, updates)
        updates, g_opt = g_tx.update(jax.grad(g_loss)(g, d, z), g_opt, g)
        return optax.apply_updates(g, updates), d, g_opt, d_opt

    count = 0
    for epoch in range(epochs):
        idx, mask = batch_indices(jax.random.fold_in(state.rng, epoch), N, B, True)
        assert float(mask.min()) == 1.0
        for rows in np.asarray(idx):
            z = jax.random.normal(jax.random.fold_in(state.key, count), (B, gan.LATENT))
            g, d, g_opt, d_opt = step(g, d, g_opt, d_opt, x_all[rows], z)
            count += 1
    return {"generator": g, "discriminator": d}


def assert_close(state, expected, rtol=1e-5, atol=1e-6):
    for part, layers in _params(state).items():
        for (k, b), (ek, eb) in zip(layers, expected[part], strict=True):
            np.testing.assert_allclose(k, np.asarray(ek), rtol=rtol, atol=atol)
            np.testing.assert_allclose(b, np.asarray(eb), rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def data():
    return gan.data(N, 0)


@pytest.fixture(scope="module")
def expected(data):
    return reference(gan.new_state(), data, 2)


def _bytes(state):
    return [np.asarray(a).tobytes() for a in jax.tree.leaves(parallel.to_host_state(state).params)]


# (chunks of 3 steps: the slow tier here; the fast tier runs them through the Trainer below,
# steps_per_execution=3, bit for bit against the whole-epoch fit)
@pytest.mark.parametrize("k, on_device", [(None, True), pytest.param(3, True, marks=pytest.mark.slow), (1, False)])
def test_the_functional_loop_runs_it_fused_and_streamed(data, expected, k, on_device):
    state, history = loop.fit(gan.new_state(), data, 2, B, steps_per_call=k, on_device=on_device)
    assert int(state.step) == 8
    assert_close(state, expected)
    assert set(history[0].metrics) == {"loss", "d_loss", "g_loss", "d_real", "d_fake", "count"}
    assert history[0].metrics["count"] == N


def test_the_trainer_runs_it_and_resumes_exactly(data, expected, tmp_path):
    whole = Trainer(TrainerConfig(max_epochs=2, batch_size=B, logging={"enable_progress_bar": False}))
    full = whole.fit(gan.new_state(), data, data)
    assert_close(full, expected)
    assert "val_d_real" in whole.callback_metrics  # validation runs the state's loss_fn

    def trainer(**kw):
        return Trainer(TrainerConfig(max_epochs=2, batch_size=B, steps_per_execution=3, **kw,
                                     logging={"enable_progress_bar": False}), callbacks=[ModelCheckpoint(tmp_path, every_n_steps=3, every_n_epochs=None)])

    trainer(max_steps=5).fit(gan.new_state(), data)  # saved at step 3 and 5 (the end of that fit)
    resumed = trainer().fit(gan.new_state(), data, ckpt_path=tmp_path / "step_000000003")
    assert _bytes(resumed) == _bytes(full)


@pytest.mark.parametrize("name, devices", [
    ("sharded", 8), ("pmap", 4), ("fsdp", 4),
    pytest.param("pmap", 8, marks=pytest.mark.slow), pytest.param("sharded", 2, marks=pytest.mark.slow),
])
def test_every_strategy_runs_it(data, expected, name, devices):
    state, _ = loop.fit(gan.new_state(), data, 2, B, strategy=parallel.make_strategy(name, devices))
    assert int(state.step) == 8
    assert_close(state, expected, rtol=PARALLEL_RTOL, atol=PARALLEL_ATOL)


def test_the_alternation_matters():
    """A negative control: the simultaneous update of both parts (the built-in step with the
    same two optimizers) ends elsewhere, so the tests above see the order of the updates."""
    data = gan.data(N, 0)

    def both_losses(model, batch):
        z = jax.random.normal(jax.random.key(0), (batch["x"].shape[0], gan.LATENT))
        d, _ = gan.discriminator_loss(model, {**batch, "z": z})
        g, _ = gan.generator_loss(model, {"z": z})
        return d + g, {}

    simultaneous = jaxlight.create_train_state(gan.GAN(rngs=nnx.Rngs(0)), gan.optimizer(), both_losses)
    state, _ = loop.fit(simultaneous, data, 2, B)
    with pytest.raises(AssertionError):
        assert_close(state, reference(gan.new_state(), data, 2))


def test_accumulation_is_refused_with_a_step_of_your_own(data):
    with pytest.raises(ValueError, match="gradient accumulation .* a state with its own step_fn"):
        Trainer(TrainerConfig(max_epochs=1, batch_size=B, accumulate_grad_batches=2,
                              logging={"enable_progress_bar": False})).fit(gan.new_state(), data)


def _state_with(step_fn):
    return jaxlight.create_train_state(gan.GAN(rngs=nnx.Rngs(0)), gan.optimizer(), gan.eval_loss, step_fn=step_fn)


@pytest.mark.parametrize("step_fn, message", [
    (lambda s, b, m, a=None: s, r"<lambda> returned TrainState; a train step returns \(state, metrics\)"),
    (lambda s, b, m, a=None: (s, {"d": jnp.zeros(())}), r"returned metrics \['d'\]; they are a dict with a 'loss'"),
    (lambda s, b, m, a=None: (s, {"loss": jnp.zeros((B,))}), r"metric 'loss' of shape \(32,\); a train step's metrics"),
    (lambda s, b, m, a=None: (s.replace(params=jax.tree.map(lambda p: p.astype(jnp.bfloat16), s.params)),
                              {"loss": jnp.zeros(())}),
     r"returned state\.params\[.*\]\.value as \(32,\) bfloat16; it came in as \(32,\) float32"),
])
def test_a_step_that_breaks_the_contract_is_named_before_training(data, step_fn, message):
    with pytest.raises(BatchError, match=message):
        loop.fit(_state_with(step_fn), data, 1, B)
