"""The image side of the ANCM: the image mechanism I = f_I(V, U_I) with its abduction encoder, and
the labeller V = h(I).

- :class:`ImageMechanism` (``mechanism.py``): a conditional VAE. ``abduct(images, factors) -> u``,
  ``decode(factors, u) -> images``, ``edit(images, factual, counterfactual)``.
- :class:`MaskedEditor` (``editor.py``): draws an edit on the photo itself through an attention
  mask (faces); trained adversarially in ``masked_training.py``. Same interface.
- :class:`Labeller` (``labeller.py``): a small CNN with one head per factor; ``predict(images)``.
- ``train.py``: ``train_labeller`` and ``train_image_mechanism`` (seeded, resumable, device-agnostic,
  rank-aware under torchrun).

Both models are rebuilt from ``(config(), state_dict())``: ``Model.from_config(cfg)`` then
``load_state_dict``; the config is plain JSON.
"""

from cfedit.image.editor import MaskedEditor
from cfedit.image.labeller import Labeller
from cfedit.image.mechanism import ImageMechanism, to_float_images
from cfedit.image.train import train_image_mechanism, train_labeller

MECHANISM_KINDS = {ImageMechanism.KIND: ImageMechanism, MaskedEditor.KIND: MaskedEditor}


def mechanism_from_config(config: dict):
    """The image mechanism a checkpoint's config describes (its ``kind``: cvae or masked), untrained."""
    kind = dict(config).get("kind", ImageMechanism.KIND)
    if kind not in MECHANISM_KINDS:
        raise ValueError(f"unknown image mechanism kind {kind!r} (known: {', '.join(MECHANISM_KINDS)})")
    return MECHANISM_KINDS[kind].from_config(config)


__all__ = ["ImageMechanism", "Labeller", "MaskedEditor", "mechanism_from_config", "to_float_images",
           "train_image_mechanism", "train_labeller"]
