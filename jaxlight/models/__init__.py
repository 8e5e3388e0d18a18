"""The built-in models, in Flax NNX, one family per file. ``torch_ref.models`` has the same
names, files and layer structure.

A built-in model is one file and one entry in :data:`MODELS`, in each framework: the class in
``jaxlight/models/<file>.py`` and its torch twin in ``torch_ref/models/<file>.py``, each listed
under the same command-line name. Beside the model lies its config,
``jaxlight/models/<name>.yaml``: what ``jaxlight fit --config <name>`` runs, and the recipe
``jaxlight.recipes`` reads from it. The weight layout between the twins is derived from the two
models (``jaxlight.bridge.layout_for``), never written by hand.

    >>> from jaxlight.models import MODELS, build_model, count_params
    >>> sorted(MODELS)
    ['cnn', 'linear', 'logistic', 'lstm', 'mlp', 'softmax']
    >>> count_params(build_model("mlp"))  # 784*256 + 256 + 256*10 + 10
    203530
"""

from __future__ import annotations

from flax import nnx

from jaxlight.models.cnn import CNN
from jaxlight.models.linear import LinearRegression, LogisticRegression, SoftmaxRegression
from jaxlight.models.mlp import MLP
from jaxlight.models.rnn import LSTM, LSTMClassifier

__all__ = [
    "CNN",
    "LSTM",
    "LSTMClassifier",
    "LinearRegression",
    "LogisticRegression",
    "MLP",
    "MODELS",
    "SoftmaxRegression",
    "build_model",
    "count_params",
    "has_conv",
    "has_scan_slow_conv",
]

# Command-line name -> class: the registry. The same names key torch_ref.models.MODELS.
MODELS = {
    "linear": LinearRegression,
    "logistic": LogisticRegression,
    "softmax": SoftmaxRegression,
    "mlp": MLP,
    "cnn": CNN,
    "lstm": LSTMClassifier,
}


def build_model(name: str, seed: int = 0) -> nnx.Module:
    """A freshly initialised model by its command-line name; ``seed`` fixes the weights."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](rngs=nnx.Rngs(params=seed))


def count_params(model_or_params) -> int:
    """Number of trainable scalars in a model or a parameter ``nnx.State``."""
    import jax

    state = model_or_params
    if isinstance(model_or_params, nnx.Module):
        state = nnx.state(model_or_params, nnx.Param)
    return sum(int(leaf.size) for leaf in jax.tree.leaves(state))


def has_conv(model: nnx.Module) -> bool:
    """Whether the model holds a convolution (these run 15-40x slower inside ``lax.scan`` on
    XLA:CPU, which decides the default training path; see ``jaxlight.step``)."""
    return any(isinstance(m, nnx.Conv) for _, m in nnx.iter_graph(model))


def has_scan_slow_conv(model: nnx.Module) -> bool:
    """Whether the model holds a convolution whose gradient is slow inside ``lax.scan`` on
    XLA:CPU: any ``nnx.Conv`` that does not use ``jaxlight.models.cnn.conv2d_nhwc`` (autodiff's
    kernel gradient falls back to a naive loop nest inside a while loop; see ``conv2d_nhwc``)."""
    from jaxlight.models.cnn import conv2d_nhwc

    return any(isinstance(m, nnx.Conv) and m.conv_general_dilated is not conv2d_nhwc
               for _, m in nnx.iter_graph(model))
