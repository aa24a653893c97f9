"""The image side of the ANCM: the image mechanism I = f_I(V, U_I) with its abduction encoder, and
the labeller V = h(I).

- :class:`ImageMechanism` (``mechanism.py``, with the shared network parts and :class:`FactorModule`):
  a conditional VAE. ``abduct(images, factors) -> u``, ``decode(factors, u) -> images``,
  ``edit(images, factual, counterfactual)``.
- :class:`MaskedEditor` (``editor.py``): draws an edit on the photo itself through an attention
  mask (faces). Same interface.
- :class:`Labeller` (``labeller.py``): a small CNN with one head per factor; ``predict(images)``.
- ``losses.py``: one training step's losses as modules, with the discriminators; ``augment.py``: the
  random translations.
- ``train.py``: ``train_labeller``, ``train_image_mechanism`` and the shared training loop (seeded,
  resumable, device-agnostic, rank-aware under torchrun); ``masked_training.py``: ``train_masked_editor``.

Every model is rebuilt from ``(config(), state_dict())``: ``Model.from_config(cfg)`` then
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
