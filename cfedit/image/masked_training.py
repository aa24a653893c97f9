"""Training of the masked editor (:class:`cfedit.image.editor.MaskedEditor`), for ``cfedit fit``.

One step, for a batch of photos x with factual factors v and targets v' (each factor resampled with
probability ``swap_p``):

    edited, m  = G(x, v -> v')              the edit
    back, m2   = G(edited, v' -> v)         the round trip
    D(x)       -> (real/fake per patch, attribute logits)   (x and the edit each randomly translated
                                                        by up to ``d_shift`` pixels before D reads them)

    D loss = hinge(D(x) real) + hinge(D(edited) fake) + cls_d * CE(D_cls(x), v)
    G loss = -D(edited) + cls_g * CE(D_cls(edited), v') + cycle * |back - x|
             + mask * mean(m, m2) + smooth * TV(m, m2)

The attribute head is trained on real photos only, alongside the realism head, so an edit is read as
v' only if it looks like real photos that have v'. Both networks train in one optimizer step: the
discriminator sees the edits detached, and the generator's losses go through a frozen copy of its
weights (so DistributedDataParallel sees one forward). The discriminator never ships.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from cfedit.image.editor import MaskedEditor
from cfedit.image.mechanism import down_plan

# swap_p: chance each factor is resampled for a step's target; cls_g / cls_d: weights of the attribute
# loss on edits (generator) and on real photos (discriminator); cycle: L1 weight of the round trip;
# mask: weight of the mean mask (sparsity: an edit changes no more of the photo than it must);
# smooth: weight of the mask's total variation; d_width: the discriminator's first width; d_shift: the
# discriminator reads real photos and edits each translated by its own random offset of up to this many
# pixels (so neither head can be fooled by a pixel-exact pattern); colour_pool / delta_bound: the
# editor's smooth, bounded colour field and its colour mode (see MaskedEditor); d_warmup: for this
# many first steps only the discriminator learns (the generator's losses are off), so that a fresh
# attribute head has learnt real faces before an editor follows it.
MASKED_DEFAULTS = {"epochs": 8, "batch_size": 32, "lr": 2e-4, "beta1": 0.5, "lr_decay": False, "width": 24,
                   "blocks": 2, "head_width": 8, "colour_pool": 2, "delta_bound": 3.0, "colour": "tone",
                   "swap_p": 0.3, "cls_g": 1.0, "cls_d": 1.0, "cycle": 10.0, "mask": 0.25, "smooth": 0.5,
                   "d_width": 32, "d_shift": 2, "d_warmup": 300, "save_every": 300}


class AttributeDiscriminator(nn.Module):
    """Real or edited per patch, plus one attribute head per factor; spectrally normalised convs."""

    def __init__(self, channels: int, size: int, sizes, width: int = 32):
        super().__init__()
        sn = nn.utils.spectral_norm
        n, base = down_plan(size, max_down=4)
        layers, c = [], channels
        for i in range(n):
            w = width * 2 ** min(i, 3)
            layers += [sn(nn.Conv2d(c, w, 4, 2, 1)), nn.LeakyReLU(0.2)]
            c = w
        self.body = nn.Sequential(*layers)
        self.adv = sn(nn.Conv2d(c, 1, 3, 1, 1))
        self.sizes = [int(s) for s in sizes]
        self.cls = nn.Linear(c * base * base, sum(self.sizes))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        h = self.body(x * 2 - 1)
        logits = self.cls(h.flatten(1)).split(self.sizes, 1)
        return self.adv(h).flatten(1), list(logits)


def _ce(logits: list[torch.Tensor], v: torch.Tensor) -> torch.Tensor:
    return sum(F.cross_entropy(lg.float(), v[:, j]) for j, lg in enumerate(logits))


def _tv(m: torch.Tensor) -> torch.Tensor:
    return (m[..., 1:, :] - m[..., :-1, :]).abs().mean() + (m[..., :, 1:] - m[..., :, :-1]).abs().mean()


class MaskedGANLoss(nn.Module):
    """One training step's losses as a module (``aux`` is the discriminator, saved in resume state)."""

    def __init__(self, editor: MaskedEditor, disc: AttributeDiscriminator, opts: Mapping):
        super().__init__()
        self.mech, self.aux = editor, disc
        self.w = {k: float(opts[k]) for k in ("cls_g", "cls_d", "cycle", "mask", "smooth")}
        self.g_on = 1.0  # 0 while only the discriminator learns (d_warmup)

    def forward(self, x: torch.Tensor, v: torch.Tensor, v_new: torch.Tensor,
                seen: Callable[[torch.Tensor, int], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """``seen(images, i)``: what the discriminator reads of the real photos (i = 0) and of the
        edits (i = 1), e.g. a random translation; the identity when None."""
        w = self.w
        seen = seen or (lambda t, i: t)
        edited, m = self.mech(x, v, v_new)
        back, m2 = self.mech(edited, v_new, v)
        real_adv, real_cls = self.aux(seen(x, 0))
        edited_seen = seen(edited, 1)
        fake_adv, _ = self.aux(edited_seen.detach())
        d_adv = F.relu(1 - real_adv).mean() + F.relu(1 + fake_adv).mean()
        d_cls = _ce(real_cls, v)
        frozen = {k: t.detach() for k, t in self.aux.named_parameters()}
        frozen.update(dict(self.aux.named_buffers()))
        g_adv_map, g_cls_logits = torch.func.functional_call(self.aux, frozen, (edited_seen,))
        g_adv = -g_adv_map.mean()
        g_cls = _ce(g_cls_logits, v_new)
        cycle = (back - x).abs().mean()
        mask = 0.5 * (m.mean() + m2.mean())
        smooth = 0.5 * (_tv(m) + _tv(m2))
        g_loss = g_adv + w["cls_g"] * g_cls + w["cycle"] * cycle + w["mask"] * mask + w["smooth"] * smooth
        loss = d_adv + w["cls_d"] * d_cls + self.g_on * g_loss
        changed = (v_new != v).any(1).float().mean()
        return {"loss": loss, "d_adv": d_adv, "d_cls": d_cls, "g_adv": g_adv, "g_cls": g_cls, "cycle": cycle,
                "mask": mask, "smooth": smooth, "changed": changed}


def train_masked_editor(dataset, graph, epochs: int | None = None, device: torch.device | str = "cpu",
                        seed: int = 0, progress: Callable | None = None, state: Mapping | None = None,
                        on_epoch: Callable[[dict], None] | None = None, init: Mapping | None = None,
                        **options) -> tuple[MaskedEditor, dict]:
    """Train the masked editor on (photo, factors) pairs; returns (editor in eval mode, metrics).

    ``options`` override :data:`MASKED_DEFAULTS`. Resumable like the other trainers (``on_epoch``
    also runs every ``save_every`` steps inside an epoch, and ``state`` resumes from there exactly).
    ``init``: a trained editor's state dict to start from (a warm start; same architecture).
    """
    from cfedit.image.train import _fit, _init, _options, shift_by

    opts = _options(MASKED_DEFAULTS, options, epochs)
    device = torch.device(device)
    editor = _init(lambda: MaskedEditor.for_graph(graph, width=opts["width"], blocks=opts["blocks"],
                                                         head_width=opts["head_width"],
                                                         colour_pool=opts["colour_pool"],
                                                         delta_bound=opts["delta_bound"],
                                                         colour=opts["colour"]),
                   seed, state, init).to(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 7)
        disc = AttributeDiscriminator(editor.channels, editor.size, editor.sizes, width=int(opts["d_width"]))
    if state is not None and "aux" in state:
        disc.load_state_dict(state["aux"])
    loss_module = MaskedGANLoss(editor, disc, opts).to(device)
    sizes = torch.tensor(editor.sizes)
    steps_done = [int(state["step"]) if state is not None else 0]  # the warm-up follows resumes exactly

    def step(module, x, v, gen):
        n = len(x)
        loss_module.g_on = 0.0 if steps_done[0] < int(opts["d_warmup"]) else 1.0
        steps_done[0] += 1
        swap = torch.rand(n, len(editor.sizes), generator=gen) < opts["swap_p"]
        # a resampled binary factor always flips: a "change" to the same value teaches nothing
        shift = (torch.rand(n, len(editor.sizes), generator=gen) * (sizes - 1)).long().clamp_max(sizes - 2) + 1
        v_new = torch.where(swap.to(v.device), (v + shift.to(v.device)) % sizes.to(v.device), v)
        s = int(opts["d_shift"])
        if s <= 0:
            return module(x, v, v_new)
        offsets = torch.randint(0, 2 * s + 1, (2, n, 2), generator=gen).to(x.device)
        return module(x, v, v_new, lambda t, i: shift_by(t, offsets[i], s))

    return _fit(editor, loss_module, step, dataset, opts, device, seed, progress, state, on_epoch)
