"""How an edit's decoded change reaches the image: the edit policy of a model, and its checkpoint section.

The image mechanism abducts u from the image and its factual factors and decodes the counterfactual
factors; the policy decides what is returned:

- plain: decode(v′, u), the mechanism's own drawing of the counterfactual;
- ``residual`` (deep-SCM style residual abduction): image + decode(v′, u) − decode(v, u), the
  decoded *change* applied to the input, so the null edit returns the input exactly and detail the
  decoder cannot draw survives.

The policy is stored as the ``edit`` section of a checkpoint's config; checkpoints of a former
policy (calibration gains, protected factors, a critic) are refused with a one-line error.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cfedit.errors import CheckpointError
from cfedit.imageio import to_uint8


@dataclass(frozen=True)
class EditPolicy:
    residual: bool = False

    def to_config(self) -> dict:
        """The checkpoint's ``edit`` section."""
        return {"residual": self.residual}

    @classmethod
    def from_checkpoint(cls, ck) -> "EditPolicy":
        """The policy a checkpoint (:class:`cfedit.checkpoint.Checkpoint`) was saved with."""
        edit = ck.config.get("edit", {})
        if "gains" in edit or "protect" in edit or "critic" in ck.config:
            raise CheckpointError(f"{ck.path}: this checkpoint edits through a calibrated, guarded decoder "
                                  "(gains, protected factors, a critic), which cfedit no longer has; refit it "
                                  "with cfedit fit")
        return cls(residual=bool(edit.get("residual", False)))

    def redraw(self, mechanism, images: np.ndarray, factual: np.ndarray, counterfactual: np.ndarray,
               residual: bool | None = None) -> np.ndarray:
        """uint8 images [n, C, S, S] with factual factors [n, k] redrawn with counterfactual factors
        [n * K, k] (K per image, consecutive) by ``mechanism``; uint8 [n * K, C, S, S]. ``residual``
        overrides the policy's setting for this call."""
        return redraw(mechanism, images, factual, counterfactual, self.residual if residual is None else residual)


def redraw(mechanism, images: np.ndarray, factual: np.ndarray, counterfactual: np.ndarray,
           residual: bool = False) -> np.ndarray:
    """:meth:`EditPolicy.redraw` for a bare image mechanism (also used before a model exists)."""
    images = np.asarray(images)
    factual = np.asarray(factual, dtype=np.int64)
    counterfactual = np.asarray(counterfactual, dtype=np.int64)
    n = len(images)
    if n == 0:
        return np.zeros((0, *images.shape[1:]), dtype=np.uint8)
    if len(counterfactual) % n:
        raise ValueError(f"{len(counterfactual)} counterfactual rows for {n} images (need a multiple)")
    k = len(counterfactual) // n
    u = np.asarray(mechanism.abduct(images, factual))
    unit = np.repeat(np.arange(n), k)  # counterfactual row -> its image
    out = np.asarray(mechanism.decode(counterfactual, u[unit]))
    if residual:
        rec = np.asarray(mechanism.decode(factual, u))
        x = images.astype(np.float32) / 255.0
        out = np.clip((x - rec)[unit] + out, 0.0, 1.0)
    return to_uint8(out)


