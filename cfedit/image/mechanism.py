"""The image mechanism I = f_I(V, U_I) and its abduction encoder U_I = e(I, V): a conditional VAE.

Why a conditional VAE: it is the smallest model that has *both* halves the ANCM needs — a decoder
conditioned on the factors and an amortised encoder that abducts the image noise in one forward pass
(no per-image optimisation, no GAN inversion) — and it trains stably in a few CPU minutes. Its known
weakness for editing is that the latent u_I also memorises the factors (a digit's identity), so a
decoder given a new digit can keep drawing the old one. ``train.py`` fixes that with an
attribute-classification loss on edited decodes (see ``train_image_mechanism``).

The factors enter the decoder twice: concatenated to u_I before the first layer and broadcast as
constant feature maps at the first spatial resolution, so the decoder cannot ignore them (an edit of
color has to move the ink to the other channel).

Generic over the graph: any factor domains (one-hot blocks of ``sizes``), 1 or 3 channels, any
square size whose halvings reach a small base (28 -> 14 -> 7, 64 -> 32 -> 16 -> 8 -> 4).

Inference helpers accept numpy or torch, uint8 (0-255) or float ([0, 1]) images; results follow the
input's library (numpy in, numpy out; torch in, torch out on the input's device).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

INFER_BATCH = 1024


# --------------------------------------------------------------------------------------------
# Shared helpers (also used by the labeller)
# --------------------------------------------------------------------------------------------

def down_plan(size: int, max_down: int = 4, min_base: int = 4) -> tuple[int, int]:
    """(number of stride-2 halvings, base resolution) for a square image of side ``size``."""
    n, s = 0, int(size)
    while s % 2 == 0 and s // 2 >= min_base and n < max_down:
        s //= 2
        n += 1
    return n, s


def widths(width: int, n: int) -> list[int]:
    """Channel widths of n stages: width, 2*width, 4*width, then flat (caps compute at 64 px)."""
    return [width * 2 ** min(i, 2) for i in range(n)]


def to_float_images(images, device: torch.device | None = None) -> torch.Tensor:
    """A float tensor in [0, 1] from uint8 (0-255) or float images, numpy or torch."""
    if isinstance(images, torch.Tensor):
        t = images
    else:
        a = np.ascontiguousarray(images)
        t = torch.from_numpy(a if a.flags.writeable else a.copy())  # read-only arrays (cached datasets)
    if device is not None:
        t = t.to(device, non_blocking=True)
    if t.dtype == torch.uint8:
        return t.float().div_(255.0)
    return t.float()


def to_long(x, device: torch.device | None = None) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(np.asarray(x, dtype=np.int64)))
    return t.to(device=device, dtype=torch.long)


def like_input(result: torch.Tensor, reference) -> Any:
    """``result`` as numpy when ``reference`` is not a tensor, else on ``reference``'s device."""
    if isinstance(reference, torch.Tensor):
        return result.to(reference.device)
    return result.cpu().numpy()


def one_hot(factors: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """Concatenated one-hot blocks [n, sum(sizes)] of value indices [n, k]."""
    return torch.cat([F.one_hot(factors[:, j], int(s)).float() for j, s in enumerate(sizes)], dim=1)


def _check_factors(factors: torch.Tensor, sizes: Sequence[int]) -> None:
    if factors.ndim != 2 or factors.shape[1] != len(sizes):
        raise ValueError(f"factors must be [n, {len(sizes)}] value indices, got shape {tuple(factors.shape)}")
    if len(factors):
        hi = torch.as_tensor(list(sizes), device=factors.device)
        if bool(((factors < 0) | (factors >= hi)).any()):
            raise ValueError(f"factor value indices out of range (domain sizes {list(sizes)})")


def _check_images(x: torch.Tensor, channels: int, size: int) -> None:
    if x.ndim != 4 or tuple(x.shape[1:]) != (channels, size, size):
        raise ValueError(f"images must be [n, {channels}, {size}, {size}], got shape {tuple(x.shape)}")


class FactorModule(nn.Module):
    """What the labeller and the image mechanism share: built from a graph's factors and image, saved as
    a plain config (``kind`` plus constructor arguments), evaluated batch by batch in eval mode."""

    KIND = ""  # the config's "kind"
    WHAT = ""  # how errors name it

    @classmethod
    def from_config(cls, config: dict[str, Any]):
        cfg = dict(config)
        kind = cfg.pop("kind", cls.KIND)
        if kind != cls.KIND:
            raise ValueError(f"unknown {cls.WHAT} kind {kind!r}")
        return cls(**cfg)

    @classmethod
    def for_graph(cls, graph, **kw):
        return cls(graph.names, [v.size for v in graph.variables], graph.image.channels, graph.image.size, **kw)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _in_batches(self, n: int, batch_size: int, step) -> list[torch.Tensor]:
        """[step(i, j) for each batch i:j of n] in eval mode, restoring the training mode after."""
        was = self.training
        self.eval()
        try:
            return [step(i, i + batch_size) for i in range(0, n, batch_size)]
        finally:
            self.train(was)

    def _abduct_batches(self, images, factors, batch_size: int, u_of) -> Any:
        """u_I [n, u_dim] of images [n, C, S, S] with factual factors [n, k]: ``u_of(x, v)`` per checked
        batch (x float in [0, 1], v long), in eval mode; numpy out for numpy in, else a tensor."""
        dev = self.device

        def step(i: int, j: int) -> torch.Tensor:
            x, v = to_float_images(images[i:j], dev), to_long(factors[i:j], dev)
            _check_images(x, self.channels, self.size)
            _check_factors(v, self.sizes)
            return u_of(x, v)

        outs = self._in_batches(len(images), batch_size, step)
        u = torch.cat(outs) if outs else torch.zeros(0, self.u_dim, device=dev)
        return like_input(u, images)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------

class ImageMechanism(FactorModule):
    """Conditional VAE: ``encode(images, factors) -> (mu, logvar)``, ``decoder_logits(factors, u)``.

    ``names``/``sizes`` are the graph's factors in ``graph.names`` order; ``latent`` is dim U_I.
    """

    KIND, WHAT = "cvae", "image mechanism"

    def __init__(self, names: Sequence[str], sizes: Sequence[int], channels: int = 3, size: int = 28,
                 width: int = 32, latent: int = 16, hidden: int = 256):
        super().__init__()
        if len(names) != len(sizes) or not names:
            raise ValueError("names and sizes must be non-empty and of equal length")
        self.names, self.sizes = tuple(str(n) for n in names), tuple(int(s) for s in sizes)
        self.channels, self.size = int(channels), int(size)
        self.width, self.latent, self.hidden = int(width), int(latent), int(hidden)
        n, base = down_plan(self.size)
        if n == 0:
            raise ValueError(f"image size {size} cannot be halved; use an even size such as 28 or 64")
        self.base = base
        ws = widths(self.width, n)
        k = sum(self.sizes)
        # encoder: image -> stride-2 convs -> flatten ++ one-hot(v) -> hidden -> (mu, logvar)
        layers: list[nn.Module] = []
        c = self.channels
        for w in ws:
            layers += [nn.Conv2d(c, w, 4, 2, 1), nn.LeakyReLU(0.2)]
            c = w
        self.enc_conv = nn.Sequential(*layers)
        flat = c * base * base
        self.enc_fc = nn.Sequential(nn.Linear(flat + k, self.hidden), nn.LeakyReLU(0.2),
                                    nn.Linear(self.hidden, 2 * self.latent))
        # decoder: (u ++ one-hot(v)) -> hidden -> base maps ++ broadcast one-hot(v) -> transposed convs
        self.dec_fc = nn.Sequential(nn.Linear(self.latent + k, self.hidden), nn.ReLU(),
                                    nn.Linear(self.hidden, c * base * base), nn.ReLU())
        self._dec_c = c
        layers = []
        c_in = c + k
        for i, w in enumerate(reversed(ws)):
            last = i == len(ws) - 1
            out = self.channels if last else ws[len(ws) - 2 - i]
            layers.append(nn.ConvTranspose2d(c_in, out, 4, 2, 1))
            if not last:
                layers.append(nn.ReLU())
            c_in = out
        self.dec_conv = nn.Sequential(*layers)

    # -- config round trip -----------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        return {"kind": "cvae", "names": list(self.names), "sizes": list(self.sizes), "channels": self.channels,
                "size": self.size, "width": self.width, "latent": self.latent, "hidden": self.hidden}

    @property
    def u_dim(self) -> int:
        """Size of the abducted u_I: the latent."""
        return self.latent

    # -- differentiable parts ----------------------------------------------------------------

    def encode(self, x: torch.Tensor, factors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar) of q(u_I | image, v); ``x`` float [n, C, S, S] in [0, 1]."""
        h = self.enc_conv(x * 2 - 1)
        mu, logvar = self.enc_fc(torch.cat([h.flatten(1), one_hot(factors, self.sizes).to(h.dtype)], 1)).chunk(2, 1)
        return mu, logvar.clamp(-12, 8)

    def decoder_logits(self, factors: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Pixel logits [n, C, S, S] of f_I(v, u); ``u`` [n, latent]."""
        oh = one_hot(factors, self.sizes).to(u.dtype)
        h = self.dec_fc(torch.cat([u, oh], 1)).view(-1, self._dec_c, self.base, self.base)
        h = torch.cat([h, oh[:, :, None, None].expand(-1, -1, self.base, self.base)], 1)
        return self.dec_conv(h)

    def posterior_mean(self, x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
        """The abducted u_I [n, latent]: the posterior mean of the latent."""
        return self.encode(x, factors)[0]

    def forward(self, x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
        """Reconstruction (float [0, 1]) through the posterior mean: the null edit."""
        return torch.sigmoid(self.decoder_logits(factors, self.posterior_mean(x, factors)))

    # -- batched inference -------------------------------------------------------------------

    @torch.inference_mode()
    def abduct(self, images, factors, batch_size: int = INFER_BATCH):
        """u_I [n, u_dim] (the posterior mean) of images [n, C, S, S] with factual factors [n, k]."""
        return self._abduct_batches(images, factors, batch_size, lambda x, v: self.posterior_mean(x, v).float())

    @torch.inference_mode()
    def decode(self, factors, u, batch_size: int = INFER_BATCH):
        """Images float [n, C, S, S] in [0, 1] of factors [n, k] (value indices) and noise u [n, u_dim].

        Numpy out when ``u`` is numpy, else a tensor on ``u``'s device.
        """
        dev = self.device

        def step(i: int, j: int) -> torch.Tensor:
            v = to_long(factors[i:j], dev)
            z = (u[i:j] if isinstance(u, torch.Tensor)
                 else torch.from_numpy(np.asarray(u[i:j], dtype=np.float32))).to(dev).float()
            _check_factors(v, self.sizes)
            return torch.sigmoid(self.decoder_logits(v, z)).float()

        outs = self._in_batches(len(u), batch_size, step)
        out = torch.cat(outs) if outs else torch.zeros(0, self.channels, self.size, self.size, device=dev)
        return like_input(out, u)

    def edit(self, images, factual, counterfactual, batch_size: int = INFER_BATCH):
        """Counterfactual images: decode(counterfactual, abduct(images, factual)); float [0, 1]."""
        if len(factual) != len(images) or len(counterfactual) != len(images):
            raise ValueError("images, factual and counterfactual factors must have the same length")
        u = self.abduct(images, factual, batch_size)
        return self.decode(counterfactual, u, batch_size)

    def sample(self, factors, generator: torch.Generator | None = None, batch_size: int = INFER_BATCH):
        """New images of ``factors`` with u_I drawn from the prior N(0, I)."""
        n = len(factors)
        u = torch.randn(n, self.latent, generator=generator)
        out = self.decode(factors, u, batch_size)
        return like_input(out, factors)
