"""The labeller V = h(I): a small CNN with one classification head per factor.

The editor uses it to read the factual factors off an input image; training the image mechanism
uses it (frozen) to check that edited decodes show the factor values they were asked for.

Architecture: the same stride-2 conv stack as the mechanism's encoder (28 -> 14 -> 7;
64 -> 32 -> 16 -> 8 -> 4), a hidden layer and the heads. No batch norm (so train and eval behave the
same and a frozen copy needs no care) and no full-resolution layer: convolutions at full resolution
cost more than the whole mechanism on a CPU.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from cfedit.image.mechanism import (
    INFER_BATCH,
    FactorModule,
    _check_images,
    down_plan,
    like_input,
    to_float_images,
    widths,
)


class Labeller(FactorModule):
    """Image -> logits of every factor. ``forward(x)`` returns a list of [n, size_j] logit tensors."""

    KIND, WHAT = "cnn", "labeller"

    def __init__(self, names: Sequence[str], sizes: Sequence[int], channels: int = 3, size: int = 28,
                 width: int = 32, hidden: int = 128):
        super().__init__()
        if len(names) != len(sizes) or not names:
            raise ValueError("names and sizes must be non-empty and of equal length")
        self.names, self.sizes = tuple(str(n) for n in names), tuple(int(s) for s in sizes)
        self.channels, self.size = int(channels), int(size)
        self.width, self.hidden = int(width), int(hidden)
        n, base = down_plan(self.size)
        if n == 0:
            raise ValueError(f"image size {size} cannot be halved; use an even size such as 28 or 64")
        layers: list[nn.Module] = []
        c = self.channels
        for w in widths(self.width, n):
            layers += [nn.Conv2d(c, w, 4, 2, 1), nn.ReLU()]
            c = w
        self.features = nn.Sequential(*layers, nn.Flatten(), nn.Linear(c * base * base, self.hidden), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(self.hidden, s) for s in self.sizes)

    def config(self) -> dict[str, Any]:
        return {"kind": "cnn", "names": list(self.names), "sizes": list(self.sizes), "channels": self.channels,
                "size": self.size, "width": self.width, "hidden": self.hidden}

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits per factor of float images [n, C, S, S] in [0, 1]."""
        h = self.features(x * 2 - 1)
        return [head(h) for head in self.heads]

    @torch.inference_mode()
    def predict_proba(self, images, batch_size: int = INFER_BATCH) -> list:
        """Per factor, probabilities [n, size_j] (numpy or torch, following ``images``)."""
        dev = self.device

        def step(i: int, j: int) -> list[torch.Tensor]:
            x = to_float_images(images[i:j], dev)
            _check_images(x, self.channels, self.size)
            return [lg.float().softmax(1) for lg in self(x)]

        batches = self._in_batches(len(images), batch_size, step)
        parts = [[b[j] for b in batches] for j in range(len(self.sizes))]
        return [like_input(torch.cat(p) if p else torch.zeros(0, s, device=dev), images)
                for p, s in zip(parts, self.sizes)]

    @torch.inference_mode()
    def predict(self, images, batch_size: int = INFER_BATCH):
        """Factor value indices int64 [n, k] of images [n, C, S, S] (uint8 or float in [0, 1])."""
        dev = self.device

        def step(i: int, j: int) -> torch.Tensor:
            x = to_float_images(images[i:j], dev)
            _check_images(x, self.channels, self.size)
            return torch.stack([lg.argmax(1) for lg in self(x)], 1)

        outs = self._in_batches(len(images), batch_size, step)
        out = torch.cat(outs) if outs else torch.zeros(0, len(self.sizes), dtype=torch.long, device=dev)
        return like_input(out, images)


def frozen_copy(labeller: Labeller, model: FactorModule) -> Labeller:
    """A frozen copy (eval mode, no gradients) of ``labeller`` to read ``model``'s outputs in training,
    refused when it was trained for another graph; the caller's labeller is left as it is."""
    if tuple(labeller.sizes) != tuple(model.sizes) or labeller.channels != model.channels:
        raise ValueError("the labeller was trained for another graph (factor domains or channels differ)")
    return copy.deepcopy(labeller).eval().requires_grad_(False)
