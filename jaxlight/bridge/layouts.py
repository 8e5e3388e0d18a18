"""Each built-in model's weight layout, derived from the model and its torch twin.

A built-in model is registered once in each framework (``jaxlight.models.MODELS``,
``torch_ref.models.MODELS``, same name). Its conversion :class:`~jaxlight.interop.Layout` is not
written by hand: :func:`layout_for` builds both models and pairs their layers with
``jaxlight.interop.derive_layout`` (by attribute name, each pair's configuration checked). A
model whose torch twin flattens an NCHW feature map where the NNX model flattens NHWC says so
in a ``torch_flatten`` class attribute (``{torch Linear name: (C, H, W)}``, the CNN's ``fc1``).

    >>> from jaxlight.bridge import layout_for
    >>> [(r.torch_name, r.kind) for r in layout_for("mlp").rules]
    [('fc1.weight', 'linear'), ('fc1.bias', 'copy'), ('fc2.weight', 'linear'), ('fc2.bias', 'copy')]

The CNN's ``fc1`` comes out as a ``flatten_linear`` rule with ``chw=(64, 7, 7)``.
"""

from __future__ import annotations

__all__ = ["layout_for"]

# (name, jaxlight class, torch class) -> Layout: building both models costs a fraction of a second.
_DERIVED: dict = {}


def layout_for(model):
    """The conversion layout of a built-in model by its command-line name, derived from the two
    registered models (or a user's own ``jaxlight.interop.Layout``, unchanged).

    Raises:
        ValueError: a name registered in neither or only one framework (naming which).
        jaxlight.interop.ConversionError: twins whose layers do not pair (the message lists both).
    """
    import jaxlight.models
    import torch_ref.models
    from jaxlight.interop import Layout, derive_layout

    if isinstance(model, Layout):
        return model
    jax_cls, torch_cls = jaxlight.models.MODELS.get(model), torch_ref.models.MODELS.get(model)
    if jax_cls is None or torch_cls is None:
        where = [f"{pkg}.models.MODELS" for pkg, cls in (("jaxlight", jax_cls), ("torch_ref", torch_cls)) if cls is None]
        raise ValueError(f"no conversion layout for model {model!r}: it is not in {' or '.join(where)} "
                         f"(built-in: {sorted(set(jaxlight.models.MODELS) & set(torch_ref.models.MODELS))}; "
                         f"or pass your own jaxlight.interop.Layout)")
    key = (model, jax_cls, torch_cls)
    if key not in _DERIVED:
        _DERIVED[key] = derive_layout(torch_ref.models.build_model(model), jaxlight.models.build_model(model),
                                      flatten=getattr(jax_cls, "torch_flatten", None), name=model)
    return _DERIVED[key]
