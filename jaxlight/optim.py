"""Optimizers by name, as Optax transformations that mean what PyTorch's mean.

Where the two libraries use the same name for different things, these factories follow PyTorch
(the reference the tutorial used) and ``torch_ref.optim`` builds the torch side from the same
arguments:

- ``adam``: identical update rules (``eps`` added outside the square root in both).
- ``adamw``: decoupled weight decay in both, but PyTorch's default ``weight_decay`` is 0.01 and
  optax's is 1e-4. We default to 0.01. Both scale the decay by the learning rate.
- ``sgd`` with ``momentum``: PyTorch keeps ``buf = momentum * buf + grad`` and steps by
  ``lr * buf`` (no dampening); optax's ``sgd(momentum=...)`` is the same trace. ``weight_decay``
  for ``sgd``/``adam`` is PyTorch's L2 penalty (added to the gradient before the update),
  which is ``optax.add_decayed_weights`` *before* the optimizer, not AdamW's decoupled decay.
"""

from __future__ import annotations

import optax

__all__ = ["OPTIMIZERS", "freeze", "make_optimizer", "adam", "adamw", "sgd"]


def _with_l2(tx: optax.GradientTransformation, weight_decay: float) -> optax.GradientTransformation:
    if not weight_decay:
        return tx
    return optax.chain(optax.add_decayed_weights(weight_decay), tx)


def adam(lr, weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
         **_) -> optax.GradientTransformation:
    """``torch.optim.Adam(lr, betas=(b1, b2), eps, weight_decay)``."""
    return _with_l2(optax.adam(lr, b1=b1, b2=b2, eps=eps), weight_decay)


def adamw(lr, weight_decay: float = 0.01, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          **_) -> optax.GradientTransformation:
    """``torch.optim.AdamW(lr, betas=(b1, b2), eps, weight_decay)``; default decay 0.01, as torch."""
    return optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)


def sgd(lr, momentum: float = 0.0, weight_decay: float = 0.0, **_) -> optax.GradientTransformation:
    """``torch.optim.SGD(lr, momentum, weight_decay)`` (no dampening, no Nesterov)."""
    return _with_l2(optax.sgd(lr, momentum=momentum or None), weight_decay)


OPTIMIZERS = {"adam": adam, "adamw": adamw, "sgd": sgd}


def make_optimizer(name: str, lr, **kwargs) -> optax.GradientTransformation:
    """The named optimizer; ``lr`` may be a float or an Optax schedule."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[name](lr, **kwargs)


def _dotted(key_path) -> str:
    """``"encoder.layers.0.kernel"`` for a tree path into an ``nnx.State`` of parameters (the
    names ``jaxlight.models.init.param_paths`` gives)."""
    import jax

    names = []
    for k in key_path:
        if isinstance(k, jax.tree_util.GetAttrKey) and k.name == "value":
            continue
        names.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
    return ".".join(names)


def freeze(tx: optax.GradientTransformation, patterns) -> optax.GradientTransformation:
    """``tx`` for the parameters that match no pattern; the others frozen.

    Built on ``optax.multi_transform``: a frozen parameter's update is zero
    (``optax.set_to_zero``), and ``tx`` never sees it, so it holds no optimizer state for it
    (no Adam moments) and a global-norm clip inside ``tx`` counts only the trained ones.

    Args:
        tx: the optimizer of the trained parameters.
        patterns: ``fnmatch`` patterns over dotted parameter paths (``"backbone.*"``; see
            ``jaxlight.models.init.param_paths``; ``*`` also matches dots).

    Raises:
        ValueError (when the state is built): a pattern matches no parameter.

    Example:
        >>> import optax
        >>> from jaxlight import build_model, create_train_state, tasks
        >>> tx = freeze(optax.adam(1e-3), ["fc1.*"])
        >>> state = create_train_state(build_model("mlp"), tx, tasks.multiclass())
    """
    import fnmatch

    import jax

    patterns = [patterns] if isinstance(patterns, str) else list(patterns)

    def labels(params):
        flat, treedef = jax.tree_util.tree_flatten_with_path(params)
        names = [_dotted(p) for p, _ in flat]
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                raise ValueError(f"freeze pattern {pattern!r} matches no parameter; the parameters: "
                                 f"{', '.join(names[:8])}{'...' if len(names) > 8 else ''}")
        return jax.tree_util.tree_unflatten(treedef, [
            "frozen" if any(fnmatch.fnmatchcase(n, p) for p in patterns) else "trained" for n in names])

    if not patterns:
        return tx
    return optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)
