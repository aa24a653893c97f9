"""Training of the labeller and the image mechanism, for ``cfedit fit``.

Both functions share one loop with these properties:

- device-agnostic: a ``torch.device`` argument; autocast (bf16, else fp16 with a grad scaler) only on
  CUDA; nothing names "cuda" unless the device is one;
- deterministic: model init, shuffling and every random draw come from ``seed`` (a CPU generator,
  so the same seed gives the same result on the same machine and thread count);
- observable: ``progress(step, total, metrics)`` is called every few steps and at each epoch end
  (rank 0 only) — ``metrics`` is a flat dict of floats plus ``"epoch"``;
- resumable: ``on_epoch(state)`` receives a state dict at the end of each epoch (rank 0 only) holding
  ``model`` (state_dict), ``config``, ``optimizer``, ``epoch``, ``step``, ``rng`` (the generator
  state) and ``history``; passing it back as ``state=`` continues exactly where it stopped (the
  result equals an uninterrupted run). Everything in it is tensors, numbers, strings, lists and dicts,
  so ``torch.save`` / ``torch.load(weights_only=True)`` round-trip it;
- data-parallel under torchrun: when ``torch.distributed`` is initialised the loss module is wrapped
  in DistributedDataParallel and each rank reads its shard through a DistributedSampler.

Data sets are anything with ``__len__`` and ``__getitem__ -> (float image [C,S,S], long factors [k])``;
those exposing ``images`` (uint8 [n,C,S,S]) and ``factors`` (int [n,k]) arrays — BarMNIST and
ImageFolderDataset — are batched straight from the arrays (no per-item Python).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import nullcontext

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from cfedit.image.labeller import Labeller
from cfedit.image.mechanism import ImageMechanism, to_float_images

Progress = Callable[[int, int, dict], None]
LOG_EVERY = 10

# lr_decay: lr falls to 0 on a cosine over the run (a function of the step, so resuming needs no
# scheduler state); it helps the classifier's last digit of accuracy but held back the short mechanism
# run in one comparison on BarMNIST (null-edit MAE 0.0132 -> 0.0149, digit effectiveness 0.99 -> 0.97).
# shift: random translation of up to this many pixels per image (augmentation; labeller only).
# flip: mirror half the images left-right (augmentation for faces; never for digits, where a mirrored
# 2 is not a 2).
LABELLER_DEFAULTS = {"epochs": 4, "batch_size": 128, "lr": 2e-3, "lr_decay": True, "width": 32, "hidden": 128,
                     "shift": 2, "flip": False}
# attr_weight: weight of the attribute-classification loss on edited decodes (in units where the
# reconstruction term is a per-image sum over pixels); swap_p: chance each factor is resampled;
# attr_residual: the labeller reads the residual edit x + decode(v', u) - decode(v, u) (what a residual
# editor outputs) instead of decode(v', u). Measured on CelebA-HQ: it makes the decoder paint
# adversarial checkerboard and color blotches that any CNN reads as the new attribute (see README), so
# it is off by default; a residual editor is better served by a decoder trained on whole decodes.
# attr_shift / attr_flip: the labeller reads the edit randomly translated by up to this many pixels /
# mirrored left-right (faces, not digits), so an edit must carry the attribute in a form that survives
# them — not in a pattern that happens to fool this one frozen network.
# adv_weight: weight (in attr_weight's units) of an adversarial loss that makes the residual edit
# x + decode(v', u) - decode(v, u) indistinguishable from real images for a patch discriminator trained
# alongside (0: off). skip: U-Net skip connections from the encoder to the decoder (0: none; 1: the
# maps one halving above the base), so reconstructions keep the image's own detail (faces).
MECHANISM_DEFAULTS = {"epochs": 5, "batch_size": 128, "lr": 1e-3, "lr_decay": False, "width": 32, "latent": 16, "hidden": 256,
                      "beta": 1.0, "attr_weight": 20.0, "swap_p": 0.5, "attr_residual": False, "attr_shift": 0,
                      "attr_flip": False, "adv_weight": 0.0, "skip": 0}


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------

def train_labeller(dataset, graph, epochs: int | None = None, device: torch.device | str = "cpu", seed: int = 0,
                   progress: Progress | None = None, state: Mapping | None = None,
                   on_epoch: Callable[[dict], None] | None = None, **options) -> tuple[Labeller, dict]:
    """Train the labeller h on (image, factors) pairs. Returns (model in eval mode, metrics).

    ``options`` override :data:`LABELLER_DEFAULTS` (batch_size, lr, lr_decay, width, hidden, shift: random
    translation augmentation in pixels, 0 to turn it off; flip: mirror a random half of each batch).
    ``metrics``: per-factor training accuracy of the last epoch (``acc_<name>``), ``loss``, ``seconds``.
    """
    opts = _options(LABELLER_DEFAULTS, options, epochs)
    device = torch.device(device)
    model = _init(lambda: Labeller.for_graph(graph, width=opts["width"], hidden=opts["hidden"]), seed,
                  state).to(device)
    names = model.names

    def step(module, x, v, gen):
        if opts["shift"]:
            x = random_shift(x, opts["shift"], gen)
        if opts["flip"]:
            x = torch.where((torch.rand(len(x), generator=gen) < 0.5).to(x.device)[:, None, None, None],
                            x.flip(3), x)
        logits = module(x)
        losses = [F.cross_entropy(lg.float(), v[:, j]) for j, lg in enumerate(logits)]
        out = {"loss": sum(losses)}
        for j, lg in enumerate(logits):
            out[f"acc_{names[j]}"] = (lg.argmax(1) == v[:, j]).float().mean()
        return out

    return _fit(model, model, step, dataset, opts, device, seed, progress, state, on_epoch)


def train_image_mechanism(dataset, graph, labeller: Labeller | None, epochs: int | None = None,
                          device: torch.device | str = "cpu", seed: int = 0, progress: Progress | None = None,
                          state: Mapping | None = None, on_epoch: Callable[[dict], None] | None = None,
                          **options) -> tuple[ImageMechanism, dict]:
    """Train the conditional-VAE image mechanism. Returns (model in eval mode, metrics).

    Loss per image = reconstruction (Bernoulli log-likelihood summed over pixels) + beta * KL(q(u|x,v)
    || N(0, I)) + attr_weight * sum_j CE(labeller(decode(v', u))_j, v'_j), where v' resamples each
    factor with probability swap_p and u is the abducted (sampled) noise of the factual image.

    Why the attribute loss (the choice among the remedies for "the latent remembers the digit"):
    a plain CVAE reconstructs and recolours well but, asked for another digit, often redraws the old
    one, because u_I keeps the digit's identity. Shrinking or regularising u_I harder trades away the
    null-edit fidelity we also need, and a latent adversary only removes *linearly/MLP-readable*
    factor information, slowly. The attribute loss attacks the symptom that matters directly — a
    decode with new factor values must be *read* as those values by a frozen, independently trained
    labeller (AttGAN/StarGAN style) — while the reconstruction term keeps the null edit exact. The
    gradient also reaches the encoder, pushing factor identity out of u_I. It costs one extra decoder
    and labeller pass per step. ``labeller=None`` (or attr_weight=0) trains the plain CVAE.

    ``metrics``: ``recon``, ``kl``, ``attr`` (last epoch means), ``loss``, ``seconds``.
    """
    opts = _options(MECHANISM_DEFAULTS, options, epochs)
    device = torch.device(device)
    model = _init(lambda: ImageMechanism.for_graph(graph, width=opts["width"], latent=opts["latent"],
                                                   hidden=opts["hidden"], skip=opts["skip"]), seed, state).to(device)
    use_attr = labeller is not None and opts["attr_weight"] > 0
    if use_attr:
        labeller = copy.deepcopy(labeller).to(device).eval()
        labeller.requires_grad_(False)
        if tuple(labeller.sizes) != tuple(model.sizes) or labeller.channels != model.channels:
            raise ValueError("the labeller was trained for another graph (factor domains or channels differ)")
    sizes = torch.tensor(model.sizes)
    disc = None
    if opts["adv_weight"] > 0:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 7)
            disc = PatchDiscriminator(model.channels)
        if state is not None and "aux" in state:
            disc.load_state_dict(state["aux"])
    loss_module = _CVAELoss(model, labeller if use_attr else None, opts["beta"], opts["attr_weight"],
                            bool(opts["attr_residual"]), int(opts["attr_shift"]), disc, float(opts["adv_weight"]))
    loss_module.to(device)

    def step(module, x, v, gen):
        n = len(x)
        eps = torch.randn(n, model.latent, generator=gen).to(x.device)
        swap = torch.rand(n, len(model.sizes), generator=gen) < opts["swap_p"]
        rand = (torch.rand(n, len(model.sizes), generator=gen) * sizes).long().clamp_max(sizes - 1)
        v_new = torch.where(swap.to(v.device), rand.to(v.device), v)
        s = int(opts["attr_shift"])
        # drawn only when used, so runs without them keep their random stream (and results)
        offsets = torch.randint(0, 2 * s + 1, (n, 2), generator=gen).to(x.device) if s else None
        flips = (torch.rand(n, generator=gen) < 0.5).to(x.device) if opts["attr_flip"] else None
        return module(x, v, eps, v_new, offsets, flips)

    return _fit(model, loss_module, step, dataset, opts, device, seed, progress, state, on_epoch)


# --------------------------------------------------------------------------------------------
# Loss modules
# --------------------------------------------------------------------------------------------

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


class _CVAELoss(nn.Module):
    """One training step's losses as a module, so DistributedDataParallel sees a single forward."""

    def __init__(self, mech: ImageMechanism, labeller: Labeller | None, beta: float, attr_weight: float,
                 attr_residual: bool = False, attr_shift: int = 0, disc: nn.Module | None = None,
                 adv_weight: float = 0.0):
        super().__init__()
        self.mech = mech
        self.labeller = labeller
        self.beta, self.attr_weight = float(beta), float(attr_weight)
        self.attr_residual, self.attr_shift = bool(attr_residual), int(attr_shift)
        self.aux = disc  # trained alongside (saved in the resume state as "aux"), never shipped
        self.adv_weight = float(adv_weight)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.labeller is not None:
            self.labeller.eval()  # frozen
        return self

    def forward(self, x, v, eps, v_new, offsets=None, flips=None) -> dict[str, torch.Tensor]:
        n = len(x)
        mu, logvar, skips = self.mech.encode_full(x, v)
        u = torch.cat([mu + eps.to(mu.dtype) * (0.5 * logvar).exp(), skips], 1)
        logits = self.mech.decoder_logits(v, u)
        recon = F.binary_cross_entropy_with_logits(logits.float(), x, reduction="sum") / n
        kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).float().sum() / n
        loss = recon + self.beta * kl
        out = {"recon": recon, "kl": kl}
        redrawn = torch.sigmoid(self.mech.decoder_logits(v_new, u)) if (self.labeller is not None or self.aux is not None) else None
        if self.labeller is not None:
            edited = redrawn
            if self.attr_residual:
                edited = (x + edited - torch.sigmoid(logits)).clamp(0.0, 1.0)
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


# --------------------------------------------------------------------------------------------
# The shared loop
# --------------------------------------------------------------------------------------------

def _options(defaults: Mapping, options: Mapping, epochs: int | None) -> dict:
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise TypeError(f"unknown training option(s): {', '.join(unknown)} (known: {', '.join(defaults)})")
    opts = {**defaults, **options}
    if epochs is not None:
        opts["epochs"] = int(epochs)
    return opts


def _init(build: Callable[[], nn.Module], seed: int, state: Mapping | None,
          init: Mapping | None = None) -> nn.Module:
    """A fresh model (seeded), else ``state``'s (resume), else starting from the weights ``init``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    if state is None and init is not None:
        _warm_start(model, init)
    if state is not None:
        if state.get("config") != model.config():
            raise ValueError(f"cannot resume: the saved model config {state.get('config')} differs from "
                             f"this run's {model.config()}")
        model.load_state_dict(state["model"])
    return model


def _warm_start(model: nn.Module, init: Mapping) -> None:
    """Load the weights of ``init`` that fit ``model``. The output layer (the last parameters) may be
    new, e.g. another colour mode of the masked editor; everything before it must match by name and shape."""
    own = model.state_dict()
    fits = {k: v for k, v in init.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    missing = [k for k in own if k not in fits]
    last = [k for k, _ in model.named_parameters()][-2:]  # the output layer's weight and bias
    if any(k not in last for k in missing):
        raise ValueError(f"cannot start from the given weights: they are another architecture "
                         f"({len(missing)} of {len(own)} tensors do not fit, e.g. {missing[0]!r})")
    model.load_state_dict({**own, **fits})


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _epoch_indices(n: int, epoch: int, gen: torch.Generator, seed: int, dataset) -> torch.Tensor:
    rank, world = _dist()
    if world > 1:
        from torch.utils.data import DistributedSampler

        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed,
                                     drop_last=True)
        sampler.set_epoch(epoch)
        return torch.tensor(list(iter(sampler)), dtype=torch.long)
    return torch.randperm(n, generator=gen)


def _batches(dataset, idx: torch.Tensor, batch_size: int, device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    images = getattr(dataset, "images", None)
    factors = getattr(dataset, "factors", None)
    fast = isinstance(images, np.ndarray) and isinstance(factors, np.ndarray)
    for i in range(0, len(idx), batch_size):
        b = idx[i:i + batch_size]
        if fast:
            bn = b.numpy()
            x = to_float_images(images[bn], device)
            v = torch.from_numpy(np.asarray(factors[bn], dtype=np.int64)).to(device)
        else:
            items = [dataset[int(j)] for j in b]
            x = to_float_images(torch.stack([torch.as_tensor(it[0]) for it in items]), device)
            v = torch.stack([torch.as_tensor(it[1], dtype=torch.long) for it in items]).to(device)
        yield x, v


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


def _cpu(obj):
    """A detached CPU copy of a (nested) state dict."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


def _fit(model: nn.Module, module: nn.Module, step_fn, dataset, opts: dict, device: torch.device, seed: int,
         progress: Progress | None, state: Mapping | None, on_epoch) -> tuple[nn.Module, dict]:
    rank, world = _dist()
    if len(dataset) < 1:
        raise ValueError("training needs at least one image")
    # one stream per rank (rank 0's equals a single-process run); shuffling under torchrun is the
    # DistributedSampler's, seeded by ``seed`` and the epoch
    gen = torch.Generator().manual_seed(int(seed) + 1_000_003 * rank)
    # the model's parameters first (so a run without auxiliary networks is unchanged), then any
    # trainable auxiliary network of the loss module (the discriminator)
    aux = getattr(module, "aux", None)
    params = list(model.parameters()) + ([p for p in aux.parameters()] if aux is not None else [])
    opt = torch.optim.Adam(params, lr=opts["lr"], betas=(float(opts.get("beta1", 0.9)), 0.999))
    start_epoch, step, history = 0, 0, []
    # a state saved inside an epoch (every ``save_every`` steps) also holds the generator's state at
    # the epoch's start (to redraw its order) and how many of its batches were done
    epoch_rng, skip_batches, part_sums = None, 0, {}
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["rng"])
        start_epoch, step = int(state["epoch"]), int(state["step"])
        history = list(state.get("history", []))
        if "epoch_rng" in state:
            epoch_rng, skip_batches = state["epoch_rng"], int(state["batch"])
            part_sums = {k: torch.tensor(float(v)) for k, v in state.get("sums", {}).items()}
    cuda = device.type == "cuda"
    amp_dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16
    autocast = (lambda: torch.autocast("cuda", dtype=amp_dtype)) if cuda else nullcontext
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and amp_dtype == torch.float16)
    wrapped = module
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(module, device_ids=[device.index] if cuda else None)

    n = len(dataset)
    per_rank = n // world if world > 1 else n
    steps_per_epoch = -(-per_rank // opts["batch_size"])
    total = steps_per_epoch * opts["epochs"]
    t0 = time.perf_counter()
    seconds0 = float(state["seconds"]) if state is not None and "seconds" in state else (
        float(history[-1]["seconds"]) if history else 0.0)
    sums: dict[str, torch.Tensor] = {}
    save_every = int(opts.get("save_every", 0) or 0)

    def snapshot(epoch_done: int) -> dict:
        saved = {"model": _cpu(model.state_dict()), "config": model.config(),
                 "optimizer": _cpu(opt.state_dict()), "epoch": epoch_done, "step": step,
                 "rng": gen.get_state(), "history": copy.deepcopy(history)}
        if aux is not None:
            saved["aux"] = _cpu(aux.state_dict())
        return saved

    for epoch in range(start_epoch, opts["epochs"]):
        module.train()
        sums, count = {}, 0
        if epoch_rng is not None:  # resuming inside this epoch: redraw its order, skip the batches done
            at_start = epoch_rng
            resumed_gen = gen.get_state()
            gen.set_state(at_start)
            idx = _epoch_indices(n, epoch, gen, seed, dataset)
            gen.set_state(resumed_gen)
            count, sums = skip_batches, part_sums
            idx = idx[skip_batches * opts["batch_size"]:]
            epoch_rng = None
        else:
            at_start = gen.get_state()
            idx = _epoch_indices(n, epoch, gen, seed, dataset)
        for x, v in _batches(dataset, idx, opts["batch_size"], device):
            with autocast():
                out = step_fn(wrapped, x, v, gen)
            if opts["lr_decay"]:
                for group in opt.param_groups:
                    group["lr"] = opts["lr"] * 0.5 * (1 + math.cos(math.pi * step / max(total, 1)))
            opt.zero_grad(set_to_none=True)
            scaler.scale(out["loss"]).backward()
            scaler.step(opt)
            scaler.update()
            step += 1
            count += 1
            for k, val in out.items():
                sums[k] = sums.get(k, 0.0) + val.detach().float()
            if progress is not None and rank == 0 and (count % LOG_EVERY == 0 or count == steps_per_epoch):
                progress(step, total, {"epoch": epoch + 1, **{k: float(s) / count for k, s in sums.items()}})
            if (save_every and on_epoch is not None and rank == 0 and count % save_every == 0
                    and count < steps_per_epoch):
                saved = snapshot(epoch)
                saved.update(epoch_rng=at_start, batch=count, sums={k: float(s) for k, s in sums.items()},
                             seconds=seconds0 + time.perf_counter() - t0)
                on_epoch(saved)
        metrics = {k: float(s) / max(count, 1) for k, s in sums.items()}
        metrics.update(epoch=epoch + 1, seconds=seconds0 + time.perf_counter() - t0)
        history.append(metrics)
        if on_epoch is not None and rank == 0:
            on_epoch(snapshot(epoch + 1))
    model.eval()
    final = dict(history[-1]) if history else {}
    final["seconds"] = seconds0 + time.perf_counter() - t0
    final["steps"] = step
    return model, final
