"""Your own train step: a small GAN (two optimizers, alternating updates) under Trainer.fit.

The generator maps 4-dimensional noise to points in the plane; the discriminator tells them
from samples of a 2-D Gaussian. Each step updates the discriminator with its own Adam, then
the generator with its own Adam against the discriminator just updated: a step written by
hand, with the signature of ``jaxlight.step.apply_train_step``, which the Trainer, the fused
epoch, checkpoints and every strategy run instead of the built-in one
(``create_train_state(..., step_fn=gan_step)``).

Trains with checkpoints, stops half way, resumes from the last checkpoint, and compares the
generated points' mean and spread with the data's.

    python docs/examples/gan.py [--epochs 30] [--out runs/gan]
"""

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxlight
from jaxlight.callbacks import ModelCheckpoint
from jaxlight.step import apply_grads, apply_optimizer

LATENT = 4
MEAN, STD = np.array([1.5, -1.0], np.float32), np.array([0.5, 0.3], np.float32)


class MLP(nnx.Module):
    def __init__(self, sizes, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = nnx.relu(layer(x))
        return self.layers[-1](x)


class GAN(nnx.Module):
    """Two parts, each trained by its own optimizer: ``generator`` (noise -> point) and
    ``discriminator`` (point -> logit that it is real)."""

    def __init__(self, hidden: int = 32, *, rngs: nnx.Rngs):
        self.generator = MLP([LATENT, hidden, 2], rngs)
        self.discriminator = MLP([2, hidden, 1], rngs)


def noise(state, mask, axis_name=None):
    """``(B, LATENT)`` normal noise for this step's batch, from the run's seed and the step
    number; under ``pmap`` drawn for the whole global batch and this device's rows kept, so
    every strategy draws the same numbers as one device."""
    key = jax.random.fold_in(state.key, state.step)
    rows = mask.shape[0]
    if axis_name is None:
        return jax.random.normal(key, (rows, LATENT))
    devices = jax.lax.psum(1, axis_name)
    z = jax.random.normal(key, (devices * rows, LATENT))
    return jax.lax.dynamic_slice_in_dim(z, jax.lax.axis_index(axis_name) * rows, rows)


def discriminator_loss(model, batch):
    """Real points scored up, generated ones down; the generator is held fixed."""
    real = model.discriminator(batch["x"])[:, 0]
    fake = model.discriminator(jax.lax.stop_gradient(model.generator(batch["z"])))[:, 0]
    losses = jax.nn.softplus(-real) + jax.nn.softplus(fake)
    return losses, {"d_real": jax.nn.sigmoid(real), "d_fake": jax.nn.sigmoid(fake)}


def generator_loss(model, batch):
    """The non-saturating generator loss: its points scored as real."""
    return jax.nn.softplus(-model.discriminator(model.generator(batch["z"]))[:, 0]), {}


def gan_step(state, batch, mask, axis_name=None):
    """One GAN step: the discriminator's update, then the generator's against it."""
    batch = {**batch, "z": noise(state, mask, axis_name)}
    grads, d, model_state = apply_grads(state, batch, mask, axis_name, loss_fn=discriminator_loss)
    state = apply_optimizer(state, grads, model_state, part="discriminator")
    grads, g, model_state = apply_grads(state, batch, mask, axis_name, loss_fn=generator_loss)
    state = apply_optimizer(state, grads, model_state, part="generator")
    return state, {"loss": d["loss"] + g["loss"], "d_loss": d["loss"], "g_loss": g["loss"],
                   "d_real": d["d_real"], "d_fake": d["d_fake"]}


def eval_loss(model, batch):
    """What validation reports: the discriminator's loss against fixed noise (evaluation has
    no step number to draw from)."""
    z = jax.random.normal(jax.random.key(0), (batch["x"].shape[0], LATENT))
    return discriminator_loss(model, {**batch, "z": z})


def optimizer():
    return jaxlight.optim.parts({"generator": optax.adam(2e-3, b1=0.5), "discriminator": optax.adam(2e-3, b1=0.5)})


def new_state(seed: int = 0):
    return jaxlight.create_train_state(GAN(rngs=nnx.Rngs(seed)), optimizer(), eval_loss, seed=seed,
                                       step_fn=gan_step)


def data(n: int, seed: int):
    rng = np.random.default_rng(seed)
    return jaxlight.ArrayDataset({"x": (MEAN + STD * rng.normal(size=(n, 2))).astype(np.float32)})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--examples", type=int, default=2048)
    p.add_argument("--out", default="runs/example-gan")
    args = p.parse_args(argv)

    train, val = data(args.examples, 0), data(256, 1)
    ckpt = Path(args.out) / "ckpt"

    def trainer(**kw):
        config = jaxlight.TrainerConfig(max_epochs=args.epochs, batch_size=64, **kw,
                                        logging={"enable_progress_bar": False})
        return jaxlight.Trainer(config, callbacks=[ModelCheckpoint(ckpt, every_n_epochs=1)])

    half = args.epochs // 2 * -(-len(train) // 64)
    trainer(max_steps=half).fit(new_state(), train, val)     # stops half way
    t = trainer()
    state = t.fit(new_state(), train, val, ckpt_path="last")  # resumes exactly there
    print(f"resumed from {t.restored_from.name}; epochs {len(t.history)}")

    z = np.asarray(jax.random.normal(jax.random.key(1), (4096, LATENT)))
    points = t.predict(state, {"z": z}, predict_fn=lambda model, batch: model.generator(batch["z"]))
    metrics = {"mean_error": float(np.abs(points.mean(0) - MEAN).max()),
               "std_ratio": [float(r) for r in points.std(0) / STD],
               "d_real": t.history[-1].metrics["d_real"], "d_fake": t.history[-1].metrics["d_fake"]}
    print(metrics)
    return metrics


if __name__ == "__main__":
    main()
