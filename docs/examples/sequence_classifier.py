"""A sequence classifier on integer tokens with a padding mask, in a dict batch.

Each example is a sequence of 4-24 token ids (vocabulary 50), padded to 24 with a per-token
``mask`` -- a key of the user's batch, separate from jaxlight's own padding mask. The label says
whether the "needle" token 1 occurs. Trains through the Trainer with checkpoints, resumes,
and loads the model for inference.

    python docs/examples/sequence_classifier.py [--epochs 8] [--out runs/tokens]
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

VOCAB, LENGTH = 50, 24


class BagOfEmbeddings(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(VOCAB, 32, rngs=rngs)
        self.hidden = nnx.Linear(32, 32, rngs=rngs)
        self.out = nnx.Linear(32, 2, rngs=rngs)

    def __call__(self, tokens, mask):  # tokens: (B, T) int32; mask: (B, T) bool
        e = nnx.relu(self.hidden(self.embed(tokens)))                 # (B, T, 32)
        weights = mask[..., None].astype(e.dtype)
        pooled = jnp.max(jnp.where(weights > 0, e, -1e9), axis=1)      # max over real tokens
        return self.out(pooled)


def loss_fn(model, batch):
    logits = model(batch["tokens"], batch["mask"])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    return losses, {"accuracy": (logits.argmax(-1) == batch["label"]).astype(jnp.float32)}


def make_data(n, seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, LENGTH + 1, n)
    tokens = rng.integers(2, VOCAB, (n, LENGTH)).astype(np.int32)
    label = rng.integers(0, 2, n).astype(np.int32)
    for i in np.flatnonzero(label):
        tokens[i, rng.integers(0, lengths[i])] = 1                     # plant the needle
    mask = np.arange(LENGTH)[None, :] < lengths[:, None]
    tokens[~mask] = 0                                                  # the pad token
    return jaxlight.ArrayDataset({"tokens": tokens, "mask": mask, "label": label})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--examples", type=int, default=4000)
    p.add_argument("--out", default="runs/example-tokens")
    args = p.parse_args(argv)

    train, val, test = make_data(args.examples, 0), make_data(500, 1), make_data(500, 2)
    ckpt = Path(args.out) / "ckpt"

    def new_state():
        return jaxlight.create_train_state(BagOfEmbeddings(nnx.Rngs(0)), optax.adam(3e-3), loss_fn, seed=0)

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

    logits = t.predict(state, test)                                   # the model's (B, 2) outputs
    model = load_model(ckpt, BagOfEmbeddings(nnx.Rngs(1)))
    model.eval()
    again = model(jnp.asarray(test.data["tokens"]), jnp.asarray(test.data["mask"]))
    np.testing.assert_allclose(np.asarray(again), logits, rtol=1e-5, atol=1e-5)
    print(f"load_model: predictions match; test accuracy {metrics['test_accuracy']:.4f}")
    return metrics


if __name__ == "__main__":
    main()
