"""Augmentations of image batches used in training: random translations (zero-padded)."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def random_shift(x: torch.Tensor, s: int, gen: torch.Generator) -> torch.Tensor:
    """Each image translated by its own random offset in [-s, s]^2, zero-padded (x: [n, C, H, W])."""
    return shift_by(x, torch.randint(0, 2 * s + 1, (len(x), 2), generator=gen).to(x.device), s)


def shift_by(x: torch.Tensor, off: torch.Tensor, s: int) -> torch.Tensor:
    """Image i translated by off[i] - s pixels (off: long [n, 2] in [0, 2s]), zero-padded."""
    n, c, h, w = x.shape
    xp = F.pad(x, (s, s, s, s))
    rows = (off[:, :1] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (off[:, 1:] + torch.arange(w, device=x.device))[:, None, None, :]
    return xp[torch.arange(n, device=x.device)[:, None, None, None], torch.arange(c, device=x.device)[None, :, None, None],
              rows, cols]
