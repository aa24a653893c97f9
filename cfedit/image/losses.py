"""The training losses of the image mechanisms, each one step's losses as a module (so that
DistributedDataParallel sees a single forward), with the discriminators they train against.

- :class:`CVAELoss`: the conditional VAE's reconstruction + KL + attribute loss (a frozen labeller reads
  the edits), optionally adversarial against a :class:`PatchDiscriminator`;
- :class:`MaskedGANLoss`: the masked editor's adversarial, attribute, cycle and mask terms against an
  :class:`AttributeDiscriminator` (see :mod:`cfedit.image.masked_training` for the step).

The discriminators train alongside (their state is in the resume state as ``aux``) and never ship.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from cfedit.image.editor import MaskedEditor, changed_union
from cfedit.image.labeller import Labeller, frozen_copy
from cfedit.image.mechanism import ImageMechanism, down_plan
from cfedit.image.augment import shift_by



class PatchDiscriminator(nn.Module):
    """Real or edited, per 8x8 patch (at 64 px): three stride-2 convs and a 3x3 head, spectrally
    normalised. Used only in training (adv_weight > 0); it never ships in a checkpoint."""

    def __init__(self, channels: int, width: int = 32):
        super().__init__()
        sn = nn.utils.spectral_norm
        self.net = nn.Sequential(
            sn(nn.Conv2d(channels, width, 4, 2, 1)), nn.LeakyReLU(0.2),
            sn(nn.Conv2d(width, 2 * width, 4, 2, 1)), nn.LeakyReLU(0.2),
            sn(nn.Conv2d(2 * width, 4 * width, 4, 2, 1)), nn.LeakyReLU(0.2),
            sn(nn.Conv2d(4 * width, 1, 3, 1, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x * 2 - 1)


class CVAELoss(nn.Module):
    """One training step's losses as a module, so DistributedDataParallel sees a single forward."""

    def __init__(self, mech: ImageMechanism, labeller: Labeller | None, beta: float, attr_weight: float,
                 attr_shift: int = 0, disc: nn.Module | None = None, adv_weight: float = 0.0):
        super().__init__()
        self.mech = mech
        self.labeller = labeller
        self.beta, self.attr_weight = float(beta), float(attr_weight)
        self.attr_shift = int(attr_shift)
        self.aux = disc  # trained alongside (saved in the resume state as "aux"), never shipped
        self.adv_weight = float(adv_weight)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.labeller is not None:
            self.labeller.eval()  # frozen
        return self

    def forward(self, x, v, eps, v_new, offsets=None, flips=None) -> dict[str, torch.Tensor]:
        n = len(x)
        mu, logvar = self.mech.encode(x, v)
        u = mu + eps.to(mu.dtype) * (0.5 * logvar).exp()
        logits = self.mech.decoder_logits(v, u)
        recon = F.binary_cross_entropy_with_logits(logits.float(), x, reduction="sum") / n
        kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).float().sum() / n
        loss = recon + self.beta * kl
        out = {"recon": recon, "kl": kl}
        redrawn = torch.sigmoid(self.mech.decoder_logits(v_new, u)) if (self.labeller is not None or self.aux is not None) else None
        if self.labeller is not None:
            edited = redrawn
            if offsets is not None:
                edited = shift_by(edited, offsets, self.attr_shift)
            if flips is not None:
                edited = torch.where(flips[:, None, None, None], edited.flip(-1), edited)
            attr = sum(F.cross_entropy(lg.float(), v_new[:, j]) for j, lg in enumerate(self.labeller(edited)))
            loss = loss + self.attr_weight * attr
            out["attr"] = attr
        if self.aux is not None:
            # adversarial realism of what a residual editor outputs: x + decode(v', u) - decode(v, u).
            # One optimizer step trains both sides: the discriminator sees the edit detached, and the
            # editor's loss goes through a frozen copy of the discriminator's weights.
            fake = (x + redrawn - torch.sigmoid(logits)).clamp(0.0, 1.0)
            real = x.roll(1, 0)  # other images of the batch
            d_loss = F.softplus(-self.aux(real)).mean() + F.softplus(self.aux(fake.detach())).mean()
            frozen = {k: t.detach() for k, t in self.aux.named_parameters()}
            frozen.update({k: t for k, t in self.aux.named_buffers()})
            g_adv = F.softplus(-torch.func.functional_call(self.aux, frozen, (fake,))).mean()
            loss = loss + d_loss + self.adv_weight * g_adv
            out["d_loss"], out["g_adv"] = d_loss, g_adv
        out["loss"] = loss
        return out


class AttributeDiscriminator(nn.Module):
    """Real or edited per patch, plus one attribute head per factor; spectrally normalised convs.

    With ``project`` the realism of each patch is conditional on the factors the photo is said to
    have (a projection discriminator, Miyato & Koyama 2018): its score adds the inner product of the
    patch's features with one learnt embedding per factor value, so a photo is judged as a real photo
    *with those factors* (an edit to eyeglasses against real photos of glasses), not as any photo.
    With ``local`` a second realism head reads the features one halving earlier (8x8 patches at 64 px,
    each seeing about a quarter of the face), so textures are judged where they are: a smudge or a
    blotch on one cheek, not only the face's layout (a multi-scale discriminator)."""

    def __init__(self, channels: int, size: int, sizes, width: int = 32, project: bool = False,
                 local: bool = False):
        super().__init__()
        sn = nn.utils.spectral_norm
        n, base = down_plan(size, max_down=4)
        layers, c, widths = [], channels, []
        for i in range(n):
            w = width * 2 ** min(i, 3)
            layers += [sn(nn.Conv2d(c, w, 4, 2, 1)), nn.LeakyReLU(0.2)]
            c = w
            widths.append(w)
        self.body = nn.Sequential(*layers)
        self.sizes = [int(s) for s in sizes]
        self.cls = nn.Linear(c * base * base, sum(self.sizes))
        self.project, self.local = bool(project), bool(local) and n >= 2
        # the realism heads: the last features, and with local those one halving earlier
        self.read_at = [2 * n - 1] + ([2 * n - 3] if self.local else [])  # indices into body
        read_widths = [widths[-1]] + ([widths[-2]] if self.local else [])
        self.adv = sn(nn.Conv2d(c, 1, 3, 1, 1))
        if self.local:
            self.adv_local = sn(nn.Conv2d(read_widths[1], 1, 3, 1, 1))
        if self.project:
            self.embed = sn(nn.Embedding(sum(self.sizes), read_widths[0]))
            if self.local:
                self.embed_local = sn(nn.Embedding(sum(self.sizes), read_widths[1]))
            self.register_buffer("offsets", torch.tensor([0] + self.sizes[:-1]).cumsum(0), persistent=False)

    def forward(self, x: torch.Tensor, v: torch.Tensor | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(realism per patch, one [n, patches] map per head, the whole-face head first; attribute
        logits per factor) of photos ``x``; ``v`` [n, k]: the factors each photo is judged as having
        (needed, and only read, with ``project``)."""
        if self.project and v is None:
            raise ValueError("a projection discriminator needs the factors each photo is judged as having")
        h, feats = x * 2 - 1, {}
        for i, layer in enumerate(self.body):
            h = layer(h)
            if i in self.read_at:
                feats[i] = h
        logits = self.cls(h.flatten(1)).split(self.sizes, 1)
        heads = [(self.adv, getattr(self, "embed", None))]
        if self.local:
            heads.append((self.adv_local, getattr(self, "embed_local", None)))
        maps = []
        for i, (head, embed) in zip(self.read_at, heads):
            a = head(feats[i])
            if self.project:
                e = embed(v.long() + self.offsets).sum(1)  # [n, c]
                a = a + (e[:, :, None, None] * feats[i]).sum(1, keepdim=True)
            maps.append(a.flatten(1))
        return maps, list(logits)


def stratum_index(v: torch.Tensor, strata, sizes) -> torch.Tensor:
    """Each row's stratum: the joint value of the factors ``strata`` (axis indices) of ``v`` [n, k],
    as one index in row-major order over their ``sizes`` (0 for every row without strata)."""
    cell = torch.zeros(len(v), dtype=torch.long, device=v.device)
    for i in strata:
        cell = cell * int(sizes[i]) + v[:, i].long()
    return cell


class HeadWeights(nn.Module):
    """How much each real photo counts in each factor's attribute loss: per factor j, a table
    [cells, size_j] read at the photo's stratum (the joint value of ``strata[j]``, other factors) and
    its value of j. Built by :func:`cfedit.image.masked_training.head_weights`; a buffer per factor, so
    the tables follow the loss module's device."""

    def __init__(self, sizes, strata, tables):
        super().__init__()
        self.sizes = [int(z) for z in sizes]
        self.strata = [tuple(int(i) for i in s) for s in strata]
        for j, t in enumerate(tables):
            if t.shape != (math.prod(self.sizes[i] for i in self.strata[j]), self.sizes[j]):
                raise ValueError(f"factor {j}: weight table of shape {tuple(t.shape)} does not fit its strata")
            self.register_buffer(f"table{j}", t.float(), persistent=False)

    def table(self, j: int) -> torch.Tensor:
        return getattr(self, f"table{j}")

    def forward(self, j: int, v: torch.Tensor) -> torch.Tensor:
        """The weight of each photo of a batch (factors ``v``, [n, k]) in factor j's loss, [n]."""
        return self.table(j)[stratum_index(v, self.strata[j], self.sizes), v[:, j]]


def _ce(logits: list[torch.Tensor], v: torch.Tensor, weights: HeadWeights | None = None) -> torch.Tensor:
    """Sum over factors of the attribute cross-entropy; with ``weights`` each photo's term is weighed
    and the factor's mean taken over the weights (a batch with no weight for it adds 0)."""
    total = 0.0
    for j, lg in enumerate(logits):
        ce = F.cross_entropy(lg.float(), v[:, j], reduction="none")
        if weights is None:
            total = total + ce.mean()
        else:
            w = weights(j, v)
            total = total + (w * ce).sum() / w.sum().clamp_min(1e-12)
    return total


def _tv(m: torch.Tensor) -> torch.Tensor:
    return (m[..., 1:, :] - m[..., :-1, :]).abs().mean() + (m[..., :, 1:] - m[..., :, :-1]).abs().mean()


class MaskedGANLoss(nn.Module):
    """One training step's losses as a module (``aux`` is the discriminator, saved in resume state)."""

    def __init__(self, editor: MaskedEditor, disc: AttributeDiscriminator, opts: Mapping,
                 regions: torch.Tensor | None = None, head_weights: HeadWeights | None = None,
                 keeper: Labeller | None = None):
        """``regions`` [k, S, S] in [0, 1]: where each factor lives (a masked pixel outside the changed
        factors' regions costs 1 + opts["region"] times as much); ``head_weights``: how much each real
        photo counts in the attribute head's loss (None: all 1); ``keeper``: a labeller whose reading
        of every factor the target keeps the edit must not move (needed when opts["keep"] > 0; read
        through a frozen copy)."""
        super().__init__()
        self.mech, self.aux = editor, disc
        self.w = {k: float(opts[k]) for k in ("cls_g", "cls_d", "cycle", "mask", "smooth")}
        self.w["keep"] = float(opts.get("keep", 0.0))
        if self.w["keep"] > 0 and keeper is None:
            raise ValueError("keep > 0 needs a labeller (the keeper) to read the edits")
        self.keeper = frozen_copy(keeper, editor) if self.w["keep"] > 0 else None
        self.region = float(opts.get("region", 0.0)) if regions is not None else 0.0
        self.register_buffer("regions", regions if regions is not None else torch.zeros(0), persistent=False)
        self.head_weights = head_weights
        # what the sparsity term prices: "mask" (the mask, so a faint change over a wide area costs as
        # much as a strong one there, and the cheapest edit is a small saturated patch) or "change"
        # (|edit - photo| per pixel: a change costs what it changes, however the mask and colour share it)
        sparsity = opts.get("sparsity", "mask")
        if sparsity not in ("mask", "change"):
            raise ValueError(f"sparsity must be 'mask' or 'change', got {sparsity!r}")
        self.sparse_change = sparsity == "change"
        self.g_on = 1.0  # 0 while only the discriminator learns (d_warmup)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.keeper is not None:
            self.keeper.eval()  # frozen
        return self

    def keep_loss(self, x: torch.Tensor, edited: torch.Tensor, v: torch.Tensor, v_new: torch.Tensor) -> torch.Tensor:
        """Sum over factors of the mean, over the rows whose target keeps that factor, of the KL
        divergence from the keeper's reading of the photo to its reading of the edit (0 when the edit
        reads exactly like its photo; factors the target changes are left to the discriminator)."""
        with torch.no_grad():
            before = [lg.float().log_softmax(1) for lg in self.keeper(x)]
        total = edited.new_zeros(())
        for j, (b, lg) in enumerate(zip(before, self.keeper(edited))):
            # a KL is >= 0; rounding leaves -1e-8 on rows that read alike, which only add noise
            kl = (b.exp() * (b - lg.float().log_softmax(1))).sum(1).clamp_min(0.0)
            same = (v_new[:, j] == v[:, j]).float()
            total = total + (kl * same).sum() / same.sum().clamp_min(1.0)
        return total

    def mask_price(self, v: torch.Tensor, v_new: torch.Tensor) -> torch.Tensor | float:
        """The price of masking each pixel, [n, 1, S, S] (or 1.0 without regions): 1 inside the
        changed factors' regions, up to 1 + region outside them (and everywhere when nothing changes)."""
        if self.region <= 0:
            return 1.0
        return 1.0 + self.region * (1.0 - changed_union(v_new != v, self.regions))

    def forward(self, x: torch.Tensor, v: torch.Tensor, v_new: torch.Tensor,
                seen: Callable[[torch.Tensor, int], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """``seen(images, i)``: what the discriminator reads of the real photos (i = 0) and of the
        edits (i = 1), e.g. a random translation; the identity when None."""
        w = self.w
        seen = seen or (lambda t, i: t)
        edited, m = self.mech(x, v, v_new)
        back, m2 = self.mech(edited, v_new, v)
        real_adv, real_cls = self.aux(seen(x, 0), v)
        edited_seen = seen(edited, 1)
        fake_adv, _ = self.aux(edited_seen.detach(), v_new)
        d_adv = sum(F.relu(1 - r).mean() + F.relu(1 + f).mean() for r, f in zip(real_adv, fake_adv))
        d_cls = _ce(real_cls, v, self.head_weights)
        frozen = {k: t.detach() for k, t in self.aux.named_parameters()}
        frozen.update(dict(self.aux.named_buffers()))
        g_adv_map, g_cls_logits = torch.func.functional_call(self.aux, frozen, (edited_seen, v_new))
        g_adv = -sum(a.mean() for a in g_adv_map)
        g_cls = _ce(g_cls_logits, v_new)
        cycle = (back - x).abs().mean()
        price = self.mask_price(v, v_new)
        if self.sparse_change:  # the change itself, per pixel (mean over channels), instead of the mask
            m_cost, m2_cost = (edited - x).abs().mean(1, keepdim=True), (back - edited).abs().mean(1, keepdim=True)
        else:
            m_cost, m2_cost = m, m2
        mask = 0.5 * ((price * m_cost).mean() + (price * m2_cost).mean())
        smooth = 0.5 * (_tv(m) + _tv(m2))
        g_loss = g_adv + w["cls_g"] * g_cls + w["cycle"] * cycle + w["mask"] * mask + w["smooth"] * smooth
        out = {}
        if self.keeper is not None:
            out["keep"] = self.keep_loss(x, edited, v, v_new)
            g_loss = g_loss + w["keep"] * out["keep"]
        loss = d_adv + w["cls_d"] * d_cls + self.g_on * g_loss
        changed = (v_new != v).any(1).float().mean()
        return {"loss": loss, "d_adv": d_adv, "d_cls": d_cls, "g_adv": g_adv, "g_cls": g_cls, "cycle": cycle,
                "mask": mask, "smooth": smooth, **out, "changed": changed}
