"""Under bf16 compute, a user's loss and its means are float32: the model's outputs reach the loss
as float32 (as ``torch.autocast`` runs cross-entropy), so the loss is the float64 cross-entropy
of the bf16 model's logits to float32 rounding, not to bf16's 1/16 steps."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxlight


def _ce64(logits, labels):
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(labels)), labels]


def test_a_users_loss_under_bf16_is_reduced_in_float32():
    from userpkg.data import blobs
    from userpkg.nets import Unrecorded, loss_fn

    train, val, test = blobs(n_train=256, n_test=512)
    state = jaxlight.create_train_state(Unrecorded(32, rngs=nnx.Rngs(0)), optax.adam(3e-2), loss_fn, seed=0)
    state = jaxlight.Trainer(jaxlight.TrainerConfig(max_epochs=30, batch_size=64,
                                                    logging={"enable_progress_bar": False})).fit(
        state, train)
    bf16 = jaxlight.Trainer(jaxlight.TrainerConfig(eval_batch_size=128, numerics={"precision": "bf16"},
                                                   logging={"enable_progress_bar": False}))
    logits = bf16.predict(state, test)                     # the bf16 model's outputs, as it computed them
    assert logits.dtype == jnp.bfloat16
    labels = np.asarray(test.data["label"])
    reference = _ce64(logits, labels).mean()
    assert reference < 0.2                                 # confident predictions: small losses
    metrics = bf16.test(state, test)
    assert metrics["test_loss"] == pytest.approx(reference, rel=2e-4)  # (two compiled programs: bf16 logits may round apart)
    assert metrics["test_accuracy"] == pytest.approx(float((np.argmax(np.asarray(logits, np.float32), 1) == labels).mean()))
    # Negative control: the same cross-entropy taken in bf16 is visibly off.
    in_bf16 = float(np.mean(np.asarray(optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(logits), labels),
                                       np.float64)))
    assert abs(in_bf16 - reference) / reference > 1e-3  # (5x the tolerance above)
