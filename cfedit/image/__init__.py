"""The image side of the ANCM: the image mechanism I = f_I(V, U_I) with its abduction encoder, and
the labeller V = h(I).

- :class:`ImageMechanism` (``mechanism.py``): a conditional VAE. ``abduct(images, factors) -> u``,
  ``decode(factors, u) -> images``, ``edit(images, factual, counterfactual)``.
- :class:`Labeller` (``labeller.py``): a small CNN with one head per factor; ``predict(images)``.
- ``train.py``: ``train_labeller`` and ``train_image_mechanism`` (seeded, resumable, device-agnostic,
  rank-aware under torchrun).

Both models are rebuilt from ``(config(), state_dict())``: ``Model.from_config(cfg)`` then
``load_state_dict``; the config is plain JSON.
"""

from cfedit.image.labeller import Labeller
from cfedit.image.mechanism import ImageMechanism, to_float_images
from cfedit.image.train import train_image_mechanism, train_labeller

__all__ = ["ImageMechanism", "Labeller", "to_float_images", "train_image_mechanism", "train_labeller"]
