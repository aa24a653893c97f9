"""Training of the masked editor (:class:`cfedit.image.editor.MaskedEditor`), for ``cfedit fit``.

One step, for a batch of photos x with factual factors v and targets v' (each factor resampled with
probability ``swap_p``):

    edited, m  = G(x, v -> v')              the edit
    back, m2   = G(edited, v' -> v)         the round trip
    D(x)       -> (real/fake per patch, attribute logits)   (x and the edit each randomly translated
                                                        by up to ``d_shift`` pixels before D reads them)

    D loss = hinge(D(x) real) + hinge(D(edited) fake) + cls_d * CE(D_cls(x), v)
    G loss = -D(edited) + cls_g * CE(D_cls(edited), v') + cycle * |back - x|
             + mask * mean(W * m, W * m2) + smooth * TV(m, m2)

W is the mask's price per pixel: 1 + ``region`` * (1 - R), where R is where in the picture the changed
factors live (:func:`attribute_regions`, from the data): a change is cheap where photos with the two
values differ and dearer elsewhere, so the mask goes where the attribute is. With ``cls_balance`` the
attribute head weighs each value by its rarity (capped at 10x), so a rare value (gray hair: 4% of
faces) is learnt as well as a common one.

The attribute head is trained on real photos only, alongside the realism head, so an edit is read as
v' only if it looks like real photos that have v'. Both networks train in one optimizer step: the
discriminator sees the edits detached, and the generator's losses go through a frozen copy of its
weights (so DistributedDataParallel sees one forward). The discriminator never ships.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch.nn import functional as F

from cfedit.image.augment import shift_by
from cfedit.image.editor import MaskedEditor
from cfedit.image.losses import AttributeDiscriminator, MaskedGANLoss
from cfedit.image.train import _fit, _init, _options

# swap_p: chance each factor is resampled for a step's target; cls_g / cls_d: weights of the attribute
# loss on edits (generator) and on real photos (discriminator); cycle: L1 weight of the round trip;
# mask: weight of the mean mask (sparsity: an edit changes no more of the photo than it must);
# smooth: weight of the mask's total variation; d_width: the discriminator's first width; d_shift: the
# discriminator reads real photos and edits each translated by its own random offset of up to this many
# pixels (so neither head can be fooled by a pixel-exact pattern); colour_pool / delta_bound: the
# editor's smooth, bounded colour field and its colour mode (see MaskedEditor); d_warmup: for this
# many first steps only the discriminator learns (the generator's losses are off), so that a fresh
# attribute head has learnt real faces before an editor follows it. region: how much dearer a masked
# pixel is outside the changed factors' regions than inside (0: the same everywhere); cls_balance:
# weigh the attribute head's values by their rarity on real photos.
MASKED_DEFAULTS = {"epochs": 8, "batch_size": 32, "lr": 2e-4, "beta1": 0.5, "width": 24,
                   "blocks": 2, "head_width": 8, "colour_pool": 2, "delta_bound": 3.0, "colour": "tone",
                   "swap_p": 0.3, "cls_g": 1.0, "cls_d": 1.0, "cycle": 10.0, "mask": 0.1, "smooth": 0.5,
                   "d_width": 32, "d_shift": 2, "d_warmup": 300, "region": 6.0, "cls_balance": True,
                   "save_every": 300}

BALANCE_CAP = 10.0  # the largest weight a rare value gets in the attribute head's loss
REGION_BLUR = 5  # the box (pixels) over which a region map is smoothed


def _arrays(dataset, chunk: int = 2048):
    """(uint8 images [b, C, S, S], int factors [b, k]) of ``dataset`` in chunks."""
    images, factors = getattr(dataset, "images", None), getattr(dataset, "factors", None)
    if isinstance(images, np.ndarray) and isinstance(factors, np.ndarray):
        for i in range(0, len(images), chunk):
            yield torch.from_numpy(np.array(images[i:i + chunk])), torch.from_numpy(np.array(factors[i:i + chunk]))
        return
    for i in range(0, len(dataset), chunk):
        items = [dataset[j] for j in range(i, min(i + chunk, len(dataset)))]
        yield (torch.stack([torch.as_tensor(it[0]) for it in items]),
               torch.stack([torch.as_tensor(it[1]) for it in items]))


def attribute_regions(dataset, sizes) -> torch.Tensor:
    """Where in the picture each factor lives, from the data: [k, S, S] in [0, 1].

    For factor j, the largest absolute difference, over pairs of its values, between the mean photos
    of the two values (averaged over channels), smoothed over a small box and scaled to a maximum of 1.
    For aligned faces the map of eyeglasses is the eye band, of smiling the mouth and cheeks, of gray
    hair the hair. A value no photo has takes part in no pair; a factor with fewer than two values seen
    gets a map of ones (no preference).
    """
    sizes = [int(z) for z in sizes]
    total, count = None, torch.zeros(len(sizes), max(sizes), dtype=torch.float64)
    for images, factors in _arrays(dataset):
        x = images.to(torch.float64)
        x = x.mean(1) / (255.0 if images.dtype == torch.uint8 else 1.0)  # [b, S, S]
        if total is None:
            total = torch.zeros(len(sizes), max(sizes), *x.shape[1:], dtype=torch.float64)
        for j, size in enumerate(sizes):
            hot = F.one_hot(factors[:, j].long(), size).to(torch.float64)  # [b, size]
            total[j, :size] += torch.einsum("bv,bhw->vhw", hot, x)
            count[j, :size] += hot.sum(0)
    maps = []
    for j, size in enumerate(sizes):
        seen = [a for a in range(size) if count[j, a] > 0]
        if len(seen) < 2:
            maps.append(torch.ones(total.shape[-2:], dtype=torch.float64))
            continue
        means = total[j, seen] / count[j, seen][:, None, None]
        diff = (means[:, None] - means[None, :]).abs().amax((0, 1))
        diff = F.avg_pool2d(diff[None, None], REGION_BLUR, 1, REGION_BLUR // 2, count_include_pad=False)[0, 0]
        maps.append(diff / diff.max().clamp_min(1e-12))
    return torch.stack(maps).float()


def value_weights(dataset, sizes) -> list[torch.Tensor]:
    """Per factor, a weight per value: 1 / (size * share of photos with it), capped at BALANCE_CAP
    (a value no photo has gets the cap: it is never a target on real photos anyway)."""
    sizes = [int(z) for z in sizes]
    count = torch.zeros(len(sizes), max(sizes), dtype=torch.float64)
    for _, factors in _arrays(dataset):
        for j, size in enumerate(sizes):
            count[j, :size] += torch.bincount(factors[:, j].long(), minlength=size)[:size].to(torch.float64)
    out = []
    for j, size in enumerate(sizes):
        share = count[j, :size] / count[j, :size].sum().clamp_min(1)
        out.append((1.0 / (size * share.clamp_min(1e-12))).clamp_max(BALANCE_CAP).float())
    return out


def train_masked_editor(dataset, graph, epochs: int | None = None, device: torch.device | str = "cpu",
                        seed: int = 0, progress: Callable | None = None, state: Mapping | None = None,
                        on_epoch: Callable[[dict], None] | None = None, init: Mapping | None = None,
                        **options) -> tuple[MaskedEditor, dict]:
    """Train the masked editor on (photo, factors) pairs; returns (editor in eval mode, metrics).

    ``options`` override :data:`MASKED_DEFAULTS`. Resumable like the other trainers (``on_epoch``
    also runs every ``save_every`` steps inside an epoch, and ``state`` resumes from there exactly).
    ``init``: a trained editor's state dict to start from (a warm start; same architecture).
    """
    opts = {**_options(MASKED_DEFAULTS, options, epochs), "lr_decay": False}
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
    regions = attribute_regions(dataset, editor.sizes) if float(opts["region"]) > 0 else None
    weights = value_weights(dataset, editor.sizes) if opts["cls_balance"] else None
    loss_module = MaskedGANLoss(editor, disc, opts, regions=regions, value_weights=weights).to(device)
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
