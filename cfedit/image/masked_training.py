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
             [+ keep * sum_j KL(h(x)_j || h(edited)_j) over the factors j the target keeps, h the
              fitted labeller, frozen]

W is the mask's price per pixel: 1 + ``region`` * (1 - R), where R is where in the picture the changed
factors live (:func:`attribute_regions`, from the data): a change is cheap where photos with the two
values differ and dearer elsewhere, so the mask goes where the attribute is. With ``gate`` the same
maps are also the editor's gate, saved with it: outside them an edit cannot change the photo at all.
With ``cls_balance`` the attribute head weighs each value by its rarity (capped at 10x), so a rare value (gray hair: 4% of
faces) is learnt as well as a common one; with ``cls_strata`` it does so within each stratum of the
factor's parents and confounded factors in the graph (:func:`head_weights`), so that the head reads
the attribute and not what goes with it in the data (gray hair, not an old face).

The attribute head is trained on real photos only, alongside the realism head, so an edit is read as
v' only if it looks like real photos that have v'. Both networks train in one optimizer step: the
discriminator sees the edits detached, and the generator's losses go through a frozen copy of its
weights (so DistributedDataParallel sees one forward). The discriminator never ships.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch.nn import functional as F

from cfedit.causal.recipes import NAMES, option_problem
from cfedit.image.augment import shift_by
from cfedit.image.editor import MaskedEditor, gate_opening
from cfedit.image.losses import AttributeDiscriminator, HeadWeights, MaskedGANLoss, stratum_index
from cfedit.image.train import _batches, _fit, _init, _options

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
# weigh the attribute head's values by their rarity on real photos; cls_strata: do so within the strata
# of each factor's parents and confounded factors (see head_weights; off: measured in docs/faces.md,
# it keeps gender through aging but draws worse age and glasses edits); gate: the editor's gate (see
# MaskedEditor: a pixel opens fully where a changed factor's region map reaches it; 0: no gate);
# d_project: the discriminator's realism is conditional on the factors (a projection discriminator:
# an edit is judged against real photos with its target factors; see AttributeDiscriminator);
# d_local: a second realism head on smaller patches (8x8 at 64 px), so local textures are judged;
# sparsity: what the mask term prices, "mask" (the mask) or "change" (|edit - photo|; see MaskedGANLoss);
# keep: weight of a term that keeps a second, frozen reader's (the fitted labeller's) reading of every
# factor the target does not change (0: off; see MaskedGANLoss.keep_loss); ema_half_life: the editor
# that a fit returns is the moving average of its weights over the steps, with this half-life in steps
# (0: the last step's weights; see cfedit.image.train.WeightAverage). The training state keeps both.
# lr_decay_epochs: the learning rate (editor and discriminator) falls linearly to 0 over the run's last
# this many epochs (0: constant; see cfedit.image.train.lr_scale). diffuse_exclude: factors where a
# diffuse factor (age, gender) may not draw: its gate leaves out their regions (see focus_regions).
MASKED_DEFAULTS = {"epochs": 8, "batch_size": 32, "lr": 2e-4, "beta1": 0.5, "width": 24,
                   "blocks": 2, "head_width": 8, "colour_pool": 2, "delta_bound": 3.0, "colour": "luma",
                   "swap_p": 0.3, "cls_g": 1.0, "cls_d": 1.0, "cycle": 10.0, "mask": 0.1, "smooth": 0.5,
                   "d_width": 32, "d_shift": 2, "d_warmup": 300, "region": 6.0, "cls_balance": True, "cls_strata": False, "gate": 0.5,
                   "d_project": False, "d_local": False, "sparsity": "mask", "keep": 0.0,
                   "ema_half_life": 0, "lr_decay_epochs": 0, "diffuse_exclude": [], "save_every": 300}

DIFFUSE_AREA = 0.35  # a factor whose map opens more of the picture than this is diffuse (see focus_regions)
FLAT_REGION = 0.5  # the map diffuse factors get when no factor is focused (or the gate's value, if higher)
BALANCE_CAP = 10.0  # the largest weight a rare value gets in the attribute head's loss
MIN_STRATUM = 50  # the fewest photos of each value a stratum needs to teach an attribute head (cls_strata)
REGION_BLUR = 5  # the box (pixels) over which a region map is smoothed
CHUNK = 2048  # photos read at a time when the maps and weights are computed


def attribute_regions(dataset, sizes) -> torch.Tensor:
    """Where in the picture each factor lives, from the data: [k, S, S] in [0, 1].

    Every pixel of every channel is fitted by least squares on all the factors at once (an intercept
    and each factor's one-hot values but its first), so a factor's coefficients are its effect with
    the others held fixed: the eyeglasses map is not the hair of men, who wear glasses more often, nor
    the gray-hair map the face of the old. A factor's map is, per pixel, the largest absolute
    difference of its coefficients over pairs of values seen in the data, averaged over channels,
    smoothed over a small box and scaled to a maximum of 1. For aligned faces the eyeglasses map is
    the eye band, smiling the mouth, gray hair the hair. A factor with fewer than two values seen gets
    a map of ones (no preference).
    """
    sizes = [int(z) for z in sizes]
    offsets = np.cumsum([0] + [z - 1 for z in sizes])  # design columns of each factor's values 1..size-1
    width = 1 + int(offsets[-1])
    xtx = torch.zeros(width, width, dtype=torch.float64)
    xty, count, shape = None, torch.zeros(len(sizes), max(sizes), dtype=torch.float64), None
    for images, factors in _batches(dataset, torch.arange(len(dataset)), CHUNK, "cpu"):
        y = images.to(torch.float64).flatten(1)  # in [0, 1]
        shape = images.shape[1:]
        design = [torch.ones(len(y), 1, dtype=torch.float64)]
        for j, size in enumerate(sizes):
            hot = F.one_hot(factors[:, j].long(), size).to(torch.float64)
            count[j, :size] += hot.sum(0)
            design.append(hot[:, 1:])
        d = torch.cat(design, 1)
        xtx += d.T @ d
        xty = d.T @ y if xty is None else xty + d.T @ y
    coef = torch.linalg.pinv(xtx) @ xty  # minimum norm where the design is degenerate
    maps = []
    for j, size in enumerate(sizes):
        seen = [a for a in range(size) if count[j, a] > 0]
        if len(seen) < 2:
            maps.append(torch.ones(shape[-2:], dtype=torch.float64))
            continue
        beta = torch.cat([torch.zeros(1, coef.shape[1], dtype=torch.float64),
                          coef[1 + offsets[j]:1 + offsets[j + 1]]])[seen].reshape(len(seen), *shape)
        diff = (beta[:, None] - beta[None, :]).abs().amax((0, 1)).mean(0)  # [S, S]
        diff = F.avg_pool2d(diff[None, None], REGION_BLUR, 1, REGION_BLUR // 2, count_include_pad=False)[0, 0]
        maps.append(diff / diff.max().clamp_min(1e-12))
    return torch.stack(maps).float()


def focus_regions(maps: torch.Tensor, gate: float = FLAT_REGION, exclude: Sequence[int] = ()) -> torch.Tensor:
    """The maps training uses. A factor whose map is diffuse (at least half of ``gate`` over more than
    DIFFUSE_AREA of the picture) gets instead the union (the per-pixel maximum) of the other, focused
    factors' maps: where the things the factors describe are. On faces the diffuse ones are age and
    gender, whose data maps are mostly background (old celebrities are photographed elsewhere than
    young ones), and the union of hair, eye band, mouth and jaw keeps their edits on the person. When
    no factor is focused, a diffuse one gets a flat map at FLAT_REGION (or ``gate`` if higher): the
    gate fully open, a middle mask price.

    ``exclude``: factors (indices) whose regions the diffuse factors' maps leave out, scaled by
    1 − the gate's opening over them, so the gate of a diffuse factor is closed wherever theirs is
    fully open: an age edit that must keep the smile cannot draw at the mouth."""
    opens_at = gate if gate > 0 else FLAT_REGION
    diffuse = (maps >= opens_at / 2).float().mean((1, 2)) > DIFFUSE_AREA
    if bool(diffuse.all()):
        union = torch.full_like(maps[0], max(FLAT_REGION, gate))
    else:
        union = maps[~diffuse].amax(0)
    exclude = [int(j) for j in exclude]
    if exclude:
        union = union * (1 - gate_opening(maps[exclude].amax(0), opens_at))
    return torch.where(diffuse[:, None, None], union[None].expand_as(maps), maps)


def balance_strata(graph) -> list[tuple[int, ...]]:
    """Per factor, the factors its attribute head is balanced within (axis indices): its parents and
    the factors confounded with it, the factors that go with it in the data without being its effect.
    On faces: gray hair within age and gender, eyeglasses and smiling within gender and age, age within
    gender, eyeglasses and smiling."""
    names = graph.names
    return [tuple(sorted(names.index(m) for m in set(graph.parents(n)) | set(graph.spouses(n)))) for n in names]


def head_weights(dataset, sizes, strata=None) -> HeadWeights:
    """How much each real photo counts in each factor's attribute loss (:class:`HeadWeights`).

    Within each stratum (a joint value of ``strata[j]``; one stratum, all photos, without strata) a
    photo with value a of factor j weighs 1 / (k_j * share of a in its stratum), k_j the number of
    values of j seen in the data, capped at
    BALANCE_CAP: every stratum keeps its photos' total weight and its values weigh alike in it, so the
    head cannot read factor j from the factors of ``strata[j]`` (gray hair from an old face) and a rare
    value is learnt as well as a common one. A stratum in which a value seen in the data has fewer than
    MIN_STRATUM photos cannot be balanced and does not teach the head (weight 0: young faces teach the
    gray-hair head nothing, 37 of 21,000 have gray hair); a factor left with no stratum falls back to
    one stratum of all photos. A value no photo has gets the cap (it is never a target on real photos).
    """
    sizes = [int(z) for z in sizes]
    strata = [tuple(s) for s in strata] if strata is not None else [()] * len(sizes)
    cells = [int(np.prod([sizes[i] for i in s])) for s in strata]
    counts = [torch.zeros(c * z, dtype=torch.float64) for c, z in zip(cells, sizes)]
    for _, factors in _batches(dataset, torch.arange(len(dataset)), CHUNK, "cpu"):
        factors = factors.long()
        for j, size in enumerate(sizes):
            cell = stratum_index(factors, strata[j], sizes)
            counts[j] += torch.bincount(cell * size + factors[:, j], minlength=cells[j] * size).to(torch.float64)

    def balanced(count, seen):  # [cells, size] -> weights, over the values seen in the data
        share = count / count.sum(1, keepdim=True).clamp_min(1)
        return (1.0 / (int(seen.sum()) * share.clamp_min(1e-12))).clamp_max(BALANCE_CAP)

    tables = []
    for j, size in enumerate(sizes):
        count = counts[j].reshape(cells[j], size)
        overall = count.sum(0, keepdim=True)  # all photos, one stratum
        seen = overall[0] > 0
        table = balanced(count, seen)
        if strata[j]:
            kept = (count[:, seen] >= MIN_STRATUM).all(1)
            if not bool(kept.any()):
                table = balanced(overall, seen).expand(cells[j], size)
            else:
                table = table * kept[:, None]
        tables.append(table.float())
    return HeadWeights(sizes, strata, tables)


def _known_names(graph, names, option: str) -> list[str]:
    """``names`` (a list or tuple of the graph's variable names) as a list, checked by the recipe
    schema's own check; a bad one is a ValueError naming the option."""
    names = list(names) if isinstance(names, (list, tuple)) else names
    problem = option_problem(NAMES, names, graph.names)
    if problem:
        raise ValueError(f"{option} {problem}")
    return names


def train_masked_editor(dataset, graph, epochs: int | None = None, device: torch.device | str = "cpu",
                        seed: int = 0, progress: Callable | None = None, state: Mapping | None = None,
                        on_epoch: Callable[[dict], None] | None = None, init: Mapping | None = None,
                        labeller=None, **options) -> tuple[MaskedEditor, dict]:
    """Train the masked editor on (photo, factors) pairs; returns (editor in eval mode, metrics).

    ``options`` override :data:`MASKED_DEFAULTS`. Resumable like the other trainers (``on_epoch``
    also runs every ``save_every`` steps inside an epoch, and ``state`` resumes from there exactly).
    ``init``: a trained editor's state dict to start from (a warm start; the same architecture or a narrower one).
    ``labeller``: the fitted labeller, read (a frozen copy) by the ``keep`` term; needed when keep > 0.
    """
    opts = {**_options(MASKED_DEFAULTS, options, epochs), "lr_decay": False}
    device = torch.device(device)
    editor = _init(lambda: MaskedEditor.for_graph(graph, width=opts["width"], blocks=opts["blocks"],
                                                         head_width=opts["head_width"],
                                                         colour_pool=opts["colour_pool"],
                                                         delta_bound=opts["delta_bound"],
                                                         colour=opts["colour"], gate=opts["gate"]),
                   seed, state, init).to(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 7)
        disc = AttributeDiscriminator(editor.channels, editor.size, editor.sizes, width=int(opts["d_width"]),
                                      project=bool(opts["d_project"]), local=bool(opts["d_local"]))
    if state is not None and "aux" in state:
        disc.load_state_dict(state["aux"])
    exclude = [graph.names.index(n) for n in _known_names(graph, opts["diffuse_exclude"], "diffuse_exclude")]
    regions = (focus_regions(attribute_regions(dataset, editor.sizes), float(opts["gate"]), exclude)
               if float(opts["region"]) > 0 or float(opts["gate"]) > 0 else None)
    if float(opts["gate"]) > 0 and state is None:  # a resumed editor has its maps in its state already
        editor.set_regions(regions.to(device))
    weights = (head_weights(dataset, editor.sizes, balance_strata(graph) if opts["cls_strata"] else None)
               if opts["cls_balance"] else None)
    loss_module = MaskedGANLoss(editor, disc, opts, regions=regions, head_weights=weights, keeper=labeller).to(device)
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
