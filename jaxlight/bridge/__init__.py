"""The cross-framework code: everything that runs jaxlight and PyTorch side by side.

The only place in ``jaxlight`` that imports ``torch`` or ``torch_ref``; the rest of ``jaxlight``
never does, and importing this package loads neither (its modules import them when called).
``torch_ref`` in turn imports only public ``jaxlight`` names, so the packages depend one way:
``jaxlight.bridge`` -> ``torch_ref`` -> ``jaxlight``.

- :mod:`jaxlight.bridge.layouts`: each built-in model's weight layout, derived from the model
  and its torch twin (:func:`layout_for`);
- :mod:`jaxlight.bridge.parity`: step-level parity (``check_parity``) through the shipped step;
- :mod:`jaxlight.bridge.compare`: ``jaxlight compare``, both frameworks trained over seeds;
- :mod:`jaxlight.bridge.porting`: ``jaxlight.port``, a torch module to its Flax NNX twin.

The conversions themselves work on numpy arrays and need neither framework:
``jaxlight.interop`` (jaxlight's side) and ``torch_ref.interop`` (``state_dict`` <-> numpy).
"""

from jaxlight.bridge.layouts import layout_for

__all__ = ["layout_for"]
