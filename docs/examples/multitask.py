"""A two-headed multi-task model: a class and a regression target, two metrics.

One trunk, two heads; the loss is cross-entropy plus mean squared error, and the metrics are
the class accuracy and the target's squared error. ``Trainer.predict`` returns both heads'
outputs as a tuple. Trains through the Trainer with checkpoints, resumes, and loads the model
for inference.

    python docs/examples/multitask.py [--epochs 10] [--out runs/multitask]
"""

import argparse
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxlight
from jaxlight.callbacks import ModelCheckpoint
from jaxlight.checkpoint import load_model


class TwoHeads(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.trunk = nnx.Linear(10, 64, rngs=rngs)
        self.classify = nnx.Linear(64, 3, rngs=rngs)
        self.regress = nnx.Linear(64, 1, rngs=rngs)

    def __call__(self, x):  # x: (B, 10) -> ((B, 3) logits, (B,) value)
        h = nnx.relu(self.trunk(x))
        return self.classify(h), self.regress(h)[:, 0]


def loss_fn(model, batch):
    logits, value = model(batch["x"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    se = jnp.square(value - batch["target"])
    return ce + se, {"accuracy": (logits.argmax(-1) == batch["label"]).astype(jnp.float32), "mse": se}


def make_data(n, seed):
    rng = np.random.default_rng(seed)
    w = np.random.default_rng(99).normal(size=(10, 4)).astype(np.float32)   # the same task for every split
    x = rng.normal(size=(n, 10)).astype(np.float32)
    z = x @ w
    return jaxlight.ArrayDataset({"x": x, "label": z[:, :3].argmax(-1).astype(np.int32),
                                  "target": (z[:, 3] + 0.1 * rng.normal(size=n)).astype(np.float32)})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--examples", type=int, default=4000)
    p.add_argument("--out", default="runs/example-multitask")
    args = p.parse_args(argv)

    train, val, test = make_data(args.examples, 0), make_data(500, 1), make_data(500, 2)
    ckpt = Path(args.out) / "ckpt"

    def new_state():
        return jaxlight.create_train_state(TwoHeads(nnx.Rngs(0)), optax.adam(3e-3), loss_fn, seed=0)

    def trainer(**kw):
        config = jaxlight.TrainerConfig(max_epochs=args.epochs, batch_size=64, **kw,
                                        logging={"enable_progress_bar": False})
        return jaxlight.Trainer(config, callbacks=[ModelCheckpoint(ckpt, every_n_epochs=1)])

    half = args.epochs // 2 * -(-len(train) // 64)
    trainer(max_steps=half).fit(new_state(), train, val)
    t = trainer()
    state = t.fit(new_state(), train, val, ckpt_path="last")
    metrics = t.test(state, test)
    print(f"resumed from {t.restored_from.name}:", {k: round(v, 4) for k, v in metrics.items()})

    logits, value = t.predict(state, test)                            # both heads, padding removed
    model = load_model(ckpt, TwoHeads(nnx.Rngs(1)))
    again_logits, again_value = model(jnp.asarray(test.data["x"]))
    np.testing.assert_allclose(np.asarray(again_logits), logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(again_value), value, rtol=1e-5, atol=1e-5)
    print(f"load_model: predictions match; accuracy {metrics['test_accuracy']:.4f}, mse {metrics['test_mse']:.4f}")
    return metrics


if __name__ == "__main__":
    main()
