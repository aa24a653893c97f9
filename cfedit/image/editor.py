"""The masked image mechanism: I' = f_I(v', u_I) drawn on the photo itself through an attention mask.

    u_I = (x, v)                      abduction: the photo and its factual factors
    C, m = G(x, v', v' - v)           a colour layer and a mask in [0, 1] per pixel
    f_I(v', u_I) = x + g * m * (C - x)    the photo, changed only where the mask is on

g is an optional gate (``gate > 0``): per pixel, how much the changed factors live there, from a map
per factor learnt from the training photos at fit time (``regions``, see
``cfedit.image.masked_training.attribute_regions``) and saved with the editor. An edit of eyeglasses
can then only touch the eye band, one of gray hair only the hair, whatever the generator draws.

The generator is a small U-Net (stride-2 downsampling, residual blocks at the base resolution,
nearest-neighbour upsampling and 3x3 convolutions, which leave no checkerboard) that reads the photo
and both factor vectors broadcast as feature maps. The colour layer is expressed
relative to the photo (``C = sigmoid(logit(x) + delta)``), so graying or a darker skin keeps the
photo's own texture; ``delta`` can be drawn at a lower resolution and bounded (``colour_pool``,
``delta_bound``), so the colour change is smooth and cannot saturate single pixels: the shapes an
edit draws come from the full-resolution mask, its colour from a smooth field. Where the counterfactual factors equal the factual ones the edit is the photo
itself, exactly (the null edit). Training (adversarial, attribute, cycle and mask terms) is in
``cfedit.image.masked_training``; why this design is in ``docs/faces.md``.

Same inference interface as :class:`cfedit.image.ImageMechanism`: ``abduct``, ``decode``, ``edit``;
numpy or torch, uint8 or float images in, results following the input's library.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from cfedit.image.mechanism import (
    INFER_BATCH,
    FactorModule,
    _check_factors,
    down_plan,
    like_input,
    one_hot,
    to_long,
)

COLOUR_MODES = ("rgb", "tone", "luma")
_LUMA = (0.299, 0.587, 0.114)  # Rec. 601 weights of a pixel's gray
_EPS = 0.01  # photo values are clamped to [_EPS, 1 - _EPS] before the logit of the colour layer


def _norm(c: int) -> nn.Module:
    return nn.InstanceNorm2d(c, affine=True)


class _Residual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1), _norm(c), nn.ReLU(),
                                  nn.Conv2d(c, c, 3, 1, 1), _norm(c))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.body(h)


def level_widths(width: int, n: int) -> list[int]:
    """The masked editor's channel width at each of its n halved resolutions (doubling twice, then flat)."""
    return [width * 2 ** min(i, 2) for i in range(n)]


def changed_union(changed: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """Per pixel, the largest of the changed factors' maps: [n, 1, S, S] from which factors change
    ([n, k] bool) and one map per factor ([k, S, S]); 0 where nothing changes."""
    return (changed.to(maps.dtype)[:, :, None, None] * maps[None]).amax(1, keepdim=True)


def gate_opening(maps: torch.Tensor, gate: float) -> torch.Tensor:
    """How open the gate is over region maps (any shape, values in [0, 1]): fully where a map reaches
    ``gate``, closed below half of it, linear in between."""
    half = gate / 2
    return ((maps - half) / half).clamp(0.0, 1.0)


def _gray(t: torch.Tensor) -> torch.Tensor:
    """Each pixel's gray [n, 1, S, S] of RGB images [n, 3, S, S]."""
    return (t * t.new_tensor(_LUMA)[None, :, None, None]).sum(1, keepdim=True)


def _logit_shift(t: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """sigmoid(logit(t) + delta), with t clamped to [_EPS, 1 - _EPS] first."""
    t = t.clamp(_EPS, 1 - _EPS)
    return torch.sigmoid(torch.log(t) - torch.log1p(-t) + delta)


class MaskedEditor(FactorModule):
    """``forward(x, v, v_new) -> (edited, mask)`` differentiable; ``abduct`` / ``decode`` / ``edit``
    batched for inference. ``names``/``sizes``: the graph's factors in ``graph.names`` order."""

    KIND, WHAT = "masked", "image mechanism"

    def __init__(self, names: Sequence[str], sizes: Sequence[int], channels: int = 3, size: int = 64,
                 width: int = 24, blocks: int = 2, head_width: int = 8, colour_pool: int = 1,
                 delta_bound: float = 0.0, colour: str = "rgb", gate: float = 0.0):
        super().__init__()
        if len(names) != len(sizes) or not names:
            raise ValueError("names and sizes must be non-empty and of equal length")
        self.names, self.sizes = tuple(str(n) for n in names), tuple(int(s) for s in sizes)
        self.channels, self.size = int(channels), int(size)
        self.width, self.blocks, self.head_width = int(width), int(blocks), int(head_width)
        # colour_pool: the colour shift is averaged over pool x pool cells and bilinearly upsampled (1: per
        # pixel); delta_bound: |delta| <= bound logits through a tanh (0: unbounded)
        self.colour_pool, self.delta_bound = int(colour_pool), float(delta_bound)
        if self.colour_pool < 1 or self.size % self.colour_pool:
            raise ValueError(f"colour_pool must be a positive divisor of the image size {size}, got {colour_pool}")
        if self.delta_bound < 0:
            raise ValueError(f"delta_bound must be >= 0, got {delta_bound}")
        # colour: "rgb", a shift per channel; "tone", one brightness shift for all channels and a
        # desaturation toward the pixel's own gray, so an edit can lighten, darken or gray the photo but
        # never change its hue (no green skin, no pink hair)
        if colour not in COLOUR_MODES:
            raise ValueError(f"colour must be one of {', '.join(COLOUR_MODES)}, got {colour!r}")
        self.colour = colour
        # gate: a pixel is fully open where a changed factor's region map reaches this value, closed
        # where it is below half of it (0: no gate). The maps are a buffer, set by set_regions at fit time
        self.gate = float(gate)
        if not 0.0 <= self.gate <= 1.0:
            raise ValueError(f"gate must be in [0, 1], got {gate}")
        if self.gate > 0:
            self.register_buffer("regions", torch.ones(len(self.sizes), self.size, self.size))
        n, self.base = down_plan(self.size, max_down=3)
        if n == 0:
            raise ValueError(f"image size {size} cannot be halved; use an even size such as 28 or 64")
        k = 2 * sum(self.sizes)  # target one-hot and its difference to the factual one-hot
        # one width per halved resolution (S/2 ... S/2^n); no convolution runs at full resolution but
        # the last two, thin ones: on a CPU, full-resolution layers cost more than all the others
        ws = level_widths(self.width, n)
        self.stem = nn.Sequential(nn.Conv2d(self.channels + k, ws[0], 4, 2, 1), nn.LeakyReLU(0.2))
        self.downs = nn.ModuleList(nn.Sequential(nn.Conv2d(ws[i - 1], ws[i], 4, 2, 1), _norm(ws[i]),
                                                 nn.LeakyReLU(0.2)) for i in range(1, n))
        self.merge = nn.Sequential(nn.Conv2d(ws[-1] + k, ws[-1], 1), nn.ReLU())  # the factors again at the base
        self.res = nn.Sequential(*[_Residual(ws[-1]) for _ in range(self.blocks)])
        # up to each skip's resolution, then read that skip (U-Net)
        self.ups = nn.ModuleList(
            nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                          nn.Conv2d(ws[i] if i == n - 1 else 2 * ws[i], ws[i - 1], 3, 1, 1), _norm(ws[i - 1]),
                          nn.ReLU()) for i in range(n - 1, 0, -1))
        self.final = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                   nn.Conv2d(ws[0] if n == 1 else 2 * ws[0], self.head_width, 3, 1, 1), nn.ReLU())
        n_colour = self.channels if colour == "rgb" else 2
        self.head = nn.Conv2d(self.head_width + self.channels, n_colour + 1, 3, 1, 1)
        with torch.no_grad():  # start as the identity: mask about 0.05, colour layer = photo
            self.head.weight.mul_(0.1)
            self.head.bias.zero_()
            self.head.bias[-1] = -3.0
            if colour in ("tone", "luma"):
                self.head.bias[1] = -4.0  # desaturation about 0.02

    def config(self) -> dict[str, Any]:
        return {"kind": self.KIND, "names": list(self.names), "sizes": list(self.sizes),
                "channels": self.channels, "size": self.size, "width": self.width, "blocks": self.blocks,
                "head_width": self.head_width, "colour_pool": self.colour_pool, "delta_bound": self.delta_bound,
                **({"colour": self.colour} if self.colour != "rgb" else {}),
                **({"gate": self.gate} if self.gate > 0 else {})}

    #: buffers that a fit sets from the data, not from a warm start's weights
    DATA_BUFFERS = ("regions",)

    def _input_groups(self, width: int, head_width: int) -> dict[str, tuple[list[int], int]]:
        """Per layer (a parameter-name prefix) of an editor of this shape but with ``width`` and
        ``head_width``: the sizes of the channel groups its input concatenates, and its output width."""
        n, k = len(self.downs) + 1, 2 * sum(self.sizes)
        ws = level_widths(int(width), n)
        groups = {"stem.0": ([self.channels + k], ws[0]), "merge.0": ([ws[-1], k], ws[-1])}
        for i in range(1, n):
            groups[f"downs.{i - 1}.0"] = ([ws[i - 1]], ws[i])
            groups[f"downs.{i - 1}.1"] = ([], ws[i])
        for b in range(self.blocks):
            for conv, norm in ((0, 1), (3, 4)):
                groups[f"res.{b}.body.{conv}"] = ([ws[-1]], ws[-1])
                groups[f"res.{b}.body.{norm}"] = ([], ws[-1])
        for j, i in enumerate(range(n - 1, 0, -1)):
            groups[f"ups.{j}.1"] = ([ws[i]] if i == n - 1 else [ws[i], ws[i]], ws[i - 1])
            groups[f"ups.{j}.2"] = ([], ws[i - 1])
        groups["final.1"] = ([ws[0]] if n == 1 else [ws[0], ws[0]], int(head_width))
        groups["head"] = ([int(head_width), self.channels], int(self.head.out_channels))
        return groups

    def widened(self, init: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """The weights ``init`` of a narrower editor (smaller width and/or head_width, otherwise the
        same shape) laid into this editor's tensors so that it draws exactly what that editor drew: each
        old channel keeps its weights and reads its old inputs only (zero weight on the new ones); the
        new channels keep this editor's fresh initialisation and are read by nothing until training
        moves the zeros. ``init`` is returned unchanged when it is not such a narrower editor."""
        try:
            old_width, old_head = int(init["stem.0.weight"].shape[0]), int(init["final.1.weight"].shape[0])
        except (KeyError, IndexError):
            return init
        if (old_width, old_head) == (self.width, self.head_width) or old_width > self.width \
                or old_head > self.head_width:
            return init
        old, new = self._input_groups(old_width, old_head), self._input_groups(self.width, self.head_width)
        own, out = self.state_dict(), dict(init)
        for prefix, (groups_new, _) in new.items():
            groups_old, width_old = old[prefix]
            for part in ("weight", "bias"):
                key, src = f"{prefix}.{part}", init.get(f"{prefix}.{part}")
                if src is None or key not in own:
                    continue
                expect = (width_old, sum(groups_old), *own[key].shape[2:]) if src.ndim == 4 else (width_old,)
                if prefix == "head" and src.shape[0] != width_old:
                    continue  # another colour mode: the output layer starts fresh (the caller allows it)
                if tuple(src.shape) != expect:
                    return init  # another architecture: the caller refuses it
                dst = own[key].clone()
                if src.ndim == 1:
                    dst[:width_old] = src
                else:
                    dst[:width_old] = 0
                    a_old = a_new = 0
                    for g_old, g_new in zip(groups_old, groups_new):
                        dst[:width_old, a_new:a_new + g_old] = src[:, a_old:a_old + g_old]
                        a_old, a_new = a_old + g_old, a_new + g_new
                out[key] = dst
        return out

    def set_regions(self, regions: torch.Tensor) -> None:
        """Set the per-factor region maps [k, S, S] in [0, 1] that the gate opens (gate > 0 only)."""
        if self.gate <= 0:
            raise ValueError("this editor has no gate (gate = 0)")
        regions = torch.as_tensor(regions, dtype=self.regions.dtype)
        if tuple(regions.shape) != tuple(self.regions.shape):
            raise ValueError(f"regions must be {list(self.regions.shape)}, got {list(regions.shape)}")
        if not bool(((regions >= 0) & (regions <= 1)).all()):
            raise ValueError("regions must lie in [0, 1]")
        with torch.no_grad():
            self.regions.copy_(regions)

    def gate_map(self, changed: torch.Tensor) -> torch.Tensor:
        """The gate [n, 1, S, S] for which factors change ([n, k] bool): per pixel the most open of
        the changed factors' maps (0 where nothing changes)."""
        return changed_union(changed, gate_opening(self.regions, self.gate))

    def _changed(self, diff: torch.Tensor) -> torch.Tensor:
        """Which factors change [n, k], from the one-hot difference v' - v [n, sum(sizes)]."""
        return torch.stack([d.abs().sum(1) > 0 for d in diff.split(list(self.sizes), 1)], 1)

    @property
    def u_dim(self) -> int:
        """Size of the abducted u_I: the flattened photo and its factual one-hot factors."""
        return self.channels * self.size * self.size + sum(self.sizes)

    # -- differentiable parts ----------------------------------------------------------------

    def forward(self, x: torch.Tensor, v: torch.Tensor, v_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(edited photo, mask [n, 1, S, S]) of float photos ``x`` in [0, 1] with factual factors ``v``
        redrawn with ``v_new`` (value indices [n, k]). Differentiable; no exact null-edit shortcut."""
        a, b = one_hot(v, self.sizes).to(x.dtype), one_hot(v_new, self.sizes).to(x.dtype)
        return self._draw(x, torch.cat([b, b - a], 1))

    def _draw(self, x: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = x.shape[-1]
        h = self.stem(torch.cat([x * 2 - 1, cond[:, :, None, None].expand(-1, -1, s, s)], 1))
        skips = [h]
        for down in self.downs:
            h = down(h)
            skips.append(h)
        h = self.merge(torch.cat([h, cond[:, :, None, None].expand(-1, -1, *h.shape[-2:])], 1))
        h = self.res(h)
        for i, up in enumerate(self.ups):
            h = torch.cat([up(h), skips[len(skips) - 2 - i]], 1)
        out = self.head(torch.cat([self.final(h), x * 2 - 1], 1))
        field, mask_logit = out[:, :-1], out[:, -1:]
        if self.colour_pool > 1:
            field = F.interpolate(F.avg_pool2d(field, self.colour_pool), size=(s, s), mode="bilinear",
                                  align_corners=False)
        delta = field if self.colour == "rgb" else field[:, :1]
        if self.delta_bound > 0:
            delta = self.delta_bound * torch.tanh(delta / self.delta_bound)
        if self.colour == "luma" and self.channels == 3:
            return self._blend(x, self._luma_colour(x, delta, field[:, 1:2]), mask_logit, cond)
        colour = _logit_shift(x, delta)
        if self.colour == "tone" and self.channels == 3:
            colour = colour + torch.sigmoid(field[:, 1:2]) * (_gray(colour) - colour)
        return self._blend(x, colour, mask_logit, cond)

    @staticmethod
    def _luma_colour(x: torch.Tensor, delta: torch.Tensor, desat_logit: torch.Tensor) -> torch.Tensor:
        """The "luma" colour layer: the pixel's gray shifted in logits, its chroma (x - gray) kept in
        absolute terms and scaled down by the desaturation; brightening a dark pixel therefore does
        not amplify its colour noise (the "tone" layer shifts each channel's logit, which does)."""
        gray = _gray(x)
        return (_logit_shift(gray, delta) + (1 - torch.sigmoid(desat_logit)) * (x - gray)).clamp(0.0, 1.0)

    def _blend(self, x, colour, mask_logit, cond):
        mask = torch.sigmoid(mask_logit)
        if self.gate > 0:
            mask = mask * self.gate_map(self._changed(cond[:, sum(self.sizes):]))
        return x + mask * (colour - x), mask

    # -- batched inference -------------------------------------------------------------------

    @torch.inference_mode()
    def abduct(self, images, factors, batch_size: int = INFER_BATCH):
        """u_I [n, u_dim]: each photo flattened (float in [0, 1]) followed by its factual one-hot factors."""
        return self._abduct_batches(images, factors, batch_size,
                                    lambda x, v: torch.cat([x.flatten(1), one_hot(v, self.sizes)], 1))

    def _split_u(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if u.ndim != 2 or u.shape[1] != self.u_dim:
            raise ValueError(f"u must be [n, {self.u_dim}] (from abduct), got shape {tuple(u.shape)}")
        p = self.channels * self.size * self.size
        return u[:, :p].reshape(-1, self.channels, self.size, self.size), u[:, p:]

    def _decode_batch(self, factors: torch.Tensor, u: torch.Tensor, with_mask: bool = False):
        x, factual_oh = self._split_u(u)
        target = one_hot(factors, self.sizes).to(x.dtype)
        out, mask = self._draw(x, torch.cat([target, target - factual_oh], 1))
        same = (target == factual_oh).all(1)
        out = torch.where(same[:, None, None, None], x, out.clamp(0.0, 1.0))  # the null edit is the photo
        mask = torch.where(same[:, None, None, None], torch.zeros_like(mask), mask)
        return (out, mask) if with_mask else out

    def _run(self, factors, u, batch_size: int, with_mask: bool):
        dev = self.device

        def step(i: int, j: int):
            v = to_long(factors[i:j], dev)
            z = (u[i:j] if isinstance(u, torch.Tensor)
                 else torch.from_numpy(np.asarray(u[i:j], dtype=np.float32))).to(dev).float()
            _check_factors(v, self.sizes)
            out = self._decode_batch(v, z, with_mask)
            return torch.cat([out[0], out[1]], 1).float() if with_mask else out.float()

        outs = self._in_batches(len(u), batch_size, step)
        c = self.channels + (1 if with_mask else 0)
        out = torch.cat(outs) if outs else torch.zeros(0, c, self.size, self.size, device=dev)
        return like_input(out, u)

    @torch.inference_mode()
    def decode(self, factors, u, batch_size: int = INFER_BATCH):
        """Edited photos float [n, C, S, S] in [0, 1] of target factors [n, k] and u [n, u_dim] (abduct's)."""
        return self._run(factors, u, batch_size, with_mask=False)

    @torch.inference_mode()
    def masks(self, images, factual, counterfactual, batch_size: int = INFER_BATCH):
        """The masks [n, 1, S, S] in [0, 1] the edit of each photo uses (0 for a null edit)."""
        u = self.abduct(images, factual, batch_size)
        out = self._run(counterfactual, u, batch_size, with_mask=True)
        return out[:, self.channels:]

    def edit(self, images, factual, counterfactual, batch_size: int = INFER_BATCH):
        """Counterfactual photos: decode(counterfactual, abduct(images, factual)); float [0, 1]."""
        if len(factual) != len(images) or len(counterfactual) != len(images):
            raise ValueError("images, factual and counterfactual factors must have the same length")
        return self.decode(counterfactual, self.abduct(images, factual, batch_size), batch_size)

    def sample(self, factors, generator: torch.Generator | None = None, batch_size: int = INFER_BATCH):
        raise ValueError("a masked editor abducts u_I from a photo; it cannot sample new images")
