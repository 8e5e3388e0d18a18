"""Your own model with Dropout and BatchNorm, on scikit-learn's 8x8 digits (not MNIST).

Trains through the Trainer with checkpoints, stops half way (as a killed job would), resumes
from the last checkpoint, tests, predicts, and loads the weights for inference with
``load_model`` -- no optimizer needed.

    python docs/examples/dropout_batchnorm.py [--epochs 20] [--out runs/digits]
"""

import argparse
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits

import jaxlight
from jaxlight.callbacks import ModelCheckpoint
from jaxlight.checkpoint import load_model


class Net(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(64, 128, use_bias=False, rngs=rngs)  # BatchNorm brings the bias
        self.bn = nnx.BatchNorm(128, momentum=0.9, rngs=rngs)      # torch's momentum 0.1
        self.drop = nnx.Dropout(0.2, rngs=rngs)
        self.fc2 = nnx.Linear(128, 10, rngs=rngs)

    def __call__(self, x):  # x: (B, 64) float32
        return self.fc2(self.drop(nnx.relu(self.bn(self.fc1(x)))))


def loss_fn(model, batch):
    logits = model(batch["image"])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    return losses, {"accuracy": (logits.argmax(-1) == batch["label"]).astype(jnp.float32)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--out", default="runs/example-digits")
    args = p.parse_args(argv)

    digits = load_digits()
    images, labels = (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int32)
    data = jaxlight.ArrayDataset({"image": images, "label": labels})
    train, test = data.split(0.2, seed=0)
    train, val = train.split(0.1, seed=1)

    ckpt = Path(args.out) / "ckpt"
    def new_state():
        return jaxlight.create_train_state(Net(nnx.Rngs(0)), optax.adam(1e-3), loss_fn, seed=0)

    def trainer(**kw):
        config = jaxlight.TrainerConfig(max_epochs=args.epochs, batch_size=64, **kw,
                                        logging={"enable_progress_bar": False})
        return jaxlight.Trainer(config, callbacks=[ModelCheckpoint(ckpt, every_n_epochs=1)])

    half = args.epochs // 2 * -(-len(train) // 64)
    trainer(max_steps=half).fit(new_state(), train, val)             # stops half way
    t = trainer()
    state = t.fit(new_state(), train, val, ckpt_path="last")          # resumes exactly there
    print(f"resumed from {t.restored_from.name}; epochs {len(t.history)}")
    metrics = t.test(state, test)
    print({k: round(v, 4) for k, v in metrics.items()})

    logits = t.predict(state, test)                                    # eval mode, padding removed
    model = load_model(ckpt, Net(nnx.Rngs(1)))                         # fresh weights, then loaded
    assert model.drop.deterministic                                   # load_model returns eval mode
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(test.data["image"]))), logits, rtol=1e-5, atol=1e-5)
    print(f"load_model: predictions match; test accuracy {metrics['test_accuracy']:.4f}")
    return metrics


if __name__ == "__main__":
    main()
