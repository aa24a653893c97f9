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
# attribute head has learnt real faces before an editor follows it.
MASKED_DEFAULTS = {"epochs": 8, "batch_size": 32, "lr": 2e-4, "beta1": 0.5, "width": 24,
                   "blocks": 2, "head_width": 8, "colour_pool": 2, "delta_bound": 3.0, "colour": "tone",
                   "swap_p": 0.3, "cls_g": 1.0, "cls_d": 1.0, "cycle": 10.0, "mask": 0.25, "smooth": 0.5,
                   "d_width": 32, "d_shift": 2, "d_warmup": 300, "save_every": 300}


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
