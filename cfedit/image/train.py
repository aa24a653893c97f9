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
- data-parallel under torchrun (see :mod:`cfedit.distributed`): when ``torch.distributed`` is
  initialised the loss module is wrapped in DistributedDataParallel (gradients averaged over the
  ranks). ``batch_size`` stays the *global* batch: every epoch has one order of the whole data set,
  drawn identically on every rank from ``seed``, and each global batch of it is split into disjoint
  contiguous parts, one per rank (a last batch smaller than the world size is dropped). So a step, the
  learning rate and the steps per epoch are those of a single process, and the saved state (epoch,
  step, batches done, the order stream, metric sums averaged over the ranks) does not depend on the
  world size: a run resumes on any number of processes. Each rank's random draws in a step come from
  a stream keyed by (seed, rank, step). Epoch metrics are means over all ranks; rank 0 alone reports
  progress and receives the states. The networks use no batch-norm (instance norm or none; any
  BatchNorm would be converted to SyncBatchNorm).

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

from cfedit.image.augment import random_shift
from cfedit.image.labeller import Labeller, frozen_copy
from cfedit.image.losses import CVAELoss, PatchDiscriminator
from cfedit.image.mechanism import ImageMechanism, to_float_images

Progress = Callable[[int, int, dict], None]
LOG_EVERY = 10

# lr_decay: lr falls to 0 on a cosine over the run; lr_decay_epochs (k > 0): lr stays until the last k
# epochs of the run and falls linearly to 0 over them (the schedule of CycleGAN and StarGAN). Both are
# functions of the step (see lr_scale), so resuming needs no scheduler state. shift: random
# translation of up to this many pixels per image (augmentation). flip: mirror half the images
# left-right (augmentation for faces; never for digits, where a mirrored 2 is not a 2).
LABELLER_DEFAULTS = {"epochs": 4, "batch_size": 128, "lr": 2e-3, "lr_decay": True, "width": 32, "hidden": 128,
                     "shift": 2, "flip": False}
# attr_weight: weight of the attribute-classification loss on edited decodes (in units where the
# reconstruction term is a per-image sum over pixels); swap_p: chance each factor is resampled;
# attr_shift / attr_flip: the labeller reads the edit randomly translated by up to this many pixels /
# mirrored left-right, so an edit must carry the attribute in a form that survives them.
# adv_weight: weight (in attr_weight's units) of an adversarial loss that makes the residual edit
# x + decode(v', u) - decode(v, u) indistinguishable from real images for a patch discriminator trained
# alongside (0: off). The mechanisms train at a constant learning rate (docs/decisions.md).
MECHANISM_DEFAULTS = {"epochs": 5, "batch_size": 128, "lr": 1e-3, "width": 32, "latent": 16, "hidden": 256,
                      "beta": 1.0, "attr_weight": 20.0, "swap_p": 0.5, "attr_shift": 0, "attr_flip": False,
                      "adv_weight": 0.0}


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

    The attribute loss makes a decode with new factor values be *read* as those values by a frozen,
    independently trained labeller, so a digit change redraws the digit (docs/decisions.md says why
    this remedy); ``labeller=None`` (or attr_weight=0) trains the plain CVAE.

    ``metrics``: ``recon``, ``kl``, ``attr`` (last epoch means), ``loss``, ``seconds``.
    """
    opts = {**_options(MECHANISM_DEFAULTS, options, epochs), "lr_decay": False}
    device = torch.device(device)
    model = _init(lambda: ImageMechanism.for_graph(graph, width=opts["width"], latent=opts["latent"],
                                                   hidden=opts["hidden"]), seed, state).to(device)
    use_attr = labeller is not None and opts["attr_weight"] > 0
    if use_attr:
        labeller = frozen_copy(labeller, model).to(device)
    sizes = torch.tensor(model.sizes)
    disc = None
    if opts["adv_weight"] > 0:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 7)
            disc = PatchDiscriminator(model.channels)
        if state is not None and "aux" in state:
            disc.load_state_dict(state["aux"])
    loss_module = CVAELoss(model, labeller if use_attr else None, opts["beta"], opts["attr_weight"],
                           int(opts["attr_shift"]), disc, float(opts["adv_weight"]))
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
# The shared loop
# --------------------------------------------------------------------------------------------

def lr_scale(step: int, total: int, steps_per_epoch: int, opts: Mapping) -> float:
    """The factor on the learning rate for the step ``step`` (0-based) of a run of ``total`` steps.

    ``lr_decay``: a cosine from 1 at the first step to 0 at the end. ``lr_decay_epochs`` k > 0: 1 until
    the last k epochs (all of the run if it has fewer), then falling linearly, the last step at
    1 / (the steps of those epochs). Otherwise 1."""
    if opts.get("lr_decay"):
        return 0.5 * (1 + math.cos(math.pi * step / max(total, 1)))
    k = int(opts.get("lr_decay_epochs", 0) or 0)
    if k <= 0:
        return 1.0
    span = max(min(k * steps_per_epoch, total), 1)
    return min(1.0, (total - step) / span)


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
    new, e.g. another colour mode of the masked editor; everything before it must match by name and shape,
    or be a narrower model that ``model.widened`` lays into its own (a wider masked editor)."""
    if hasattr(model, "widened"):
        init = model.widened(init)
    own = model.state_dict()
    fits = {k: v for k, v in init.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    data_buffers = tuple(getattr(model, "DATA_BUFFERS", ()))  # set from the data by the fit itself
    # the model's tensors that do not fit, then those of init that the model lacks (e.g. a deeper model's)
    missing = [k for k in dict.fromkeys([*own, *init]) if k not in fits and k.split(".")[-1] not in data_buffers]
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
    """The epoch's order of the whole data set (the same on every rank: ``gen`` is the order stream)."""
    return torch.randperm(n, generator=gen)


def _rank_batches(dataset, idx: torch.Tensor, batch_size: int, device, rank: int,
                  world: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's part of each global batch of ``idx`` (all of it in a one-process run)."""
    if world == 1:
        yield from _batches(dataset, idx, batch_size, device)
        return
    from cfedit.distributed import shard

    for i in range(0, len(idx), batch_size):
        part = idx[i:i + batch_size]
        if len(part) < world:  # too small to give every rank a sample: dropped on all ranks alike
            return
        mine = shard(part, rank, world)
        yield from _batches(dataset, mine, len(mine), device)


def _step_gen(seed: int, rank: int, step: int) -> torch.Generator:
    """Rank ``rank``'s random stream for global step ``step`` under torchrun."""
    key = np.random.SeedSequence([int(seed), int(rank), int(step)]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(key[0]) << 32 | int(key[1]))


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


def _cpu(obj):
    """A detached CPU copy of a (nested) state dict."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


class WeightAverage:
    """An exponential moving average of a model's weights over the training steps (the generator
    average of GAN training): ``weights`` moves toward the model's parameters by ``1 - decay`` after each
    step, the decay set by a half-life in steps (after ``half_life`` steps of a model that stood still,
    half of the gap remains); buffers are copied as they are."""

    def __init__(self, model: nn.Module, half_life: float, weights: Mapping[str, torch.Tensor] | None = None):
        if not (half_life > 0 and math.isfinite(half_life)):
            raise ValueError(f"ema_half_life must be a number of steps > 0 for an average, got {half_life}")
        self.decay = 0.5 ** (1.0 / half_life)
        own = model.state_dict()
        if weights is not None and set(weights) != set(own):
            raise ValueError("cannot resume: the saved weight average holds other tensors than the model")
        self.weights = {k: (weights[k] if weights is not None else t).detach().to(t.device, t.dtype, copy=True)
                        for k, t in own.items()}
        self._params = {k for k, _ in model.named_parameters()}

    @classmethod
    def start(cls, model: nn.Module, half_life: float, weights: Mapping[str, torch.Tensor] | None = None):
        """The average of ``model`` (resumed from ``weights``), or None when ``half_life`` is 0 (off)."""
        return None if half_life == 0 else cls(model, half_life, weights)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for k, t in model.state_dict().items():
            if k in self._params and t.is_floating_point():
                self.weights[k].lerp_(t, 1.0 - self.decay)
            else:
                self.weights[k].copy_(t)


def _fit(model: nn.Module, module: nn.Module, step_fn, dataset, opts: dict, device: torch.device, seed: int,
         progress: Progress | None, state: Mapping | None, on_epoch) -> tuple[nn.Module, dict]:
    from cfedit.distributed import gather_ints, mean_across_ranks

    rank, world = _dist()
    if len(dataset) < world:
        raise ValueError(f"training on {world} processes needs at least {world} images" if world > 1 else
                         "training needs at least one image")
    # one process: one stream for the order and every draw. Under torchrun the same stream draws each
    # epoch's order on every rank alike, and a rank's draws in a step come from _step_gen
    gen = torch.Generator().manual_seed(int(seed))
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

        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)  # a no-op: the networks have no batch-norm
        index = (device.index if device.index is not None else torch.cuda.current_device()) if cuda else None
        wrapped = DDP(module, device_ids=[index] if cuda else None)

    n = len(dataset)
    steps_per_epoch = -(-n // opts["batch_size"])
    if world > 1 and 0 < n % opts["batch_size"] < world:
        steps_per_epoch -= 1  # the last global batch is dropped (see _rank_batches)
    seen = 0  # samples this rank trained on in this run
    total = steps_per_epoch * opts["epochs"]
    t0 = time.perf_counter()
    seconds0 = float(state["seconds"]) if state is not None and "seconds" in state else (
        float(history[-1]["seconds"]) if history else 0.0)
    sums: dict[str, torch.Tensor] = {}
    save_every = int(opts.get("save_every", 0) or 0)
    decaying = bool(opts.get("lr_decay")) or int(opts.get("lr_decay_epochs", 0) or 0) > 0
    average = WeightAverage.start(model, float(opts.get("ema_half_life", 0) or 0),
                                  state.get("ema") if state is not None else None)

    def snapshot(epoch_done: int) -> dict:
        saved = {"model": _cpu(model.state_dict()), "config": model.config(),
                 "optimizer": _cpu(opt.state_dict()), "epoch": epoch_done, "step": step,
                 "rng": gen.get_state(), "history": copy.deepcopy(history)}
        if aux is not None:
            saved["aux"] = _cpu(aux.state_dict())
        if average is not None:
            saved["ema"] = _cpu(average.weights)
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
        for x, v in _rank_batches(dataset, idx, opts["batch_size"], device, rank, world):
            with autocast():
                out = step_fn(wrapped, x, v, gen if world == 1 else _step_gen(seed, rank, step))
            if decaying:
                for group in opt.param_groups:
                    group["lr"] = opts["lr"] * lr_scale(step, total, steps_per_epoch, opts)
            opt.zero_grad(set_to_none=True)
            scaler.scale(out["loss"]).backward()
            scaler.step(opt)
            scaler.update()
            if average is not None:
                average.update(model)
            step += 1
            count += 1
            seen += len(x)
            for k, val in out.items():
                sums[k] = sums.get(k, 0.0) + val.detach().float()
            if progress is not None and rank == 0 and (count % LOG_EVERY == 0 or count == steps_per_epoch):
                progress(step, total, {"epoch": epoch + 1, **{k: float(s) / count for k, s in sums.items()}})
            if save_every and on_epoch is not None and count % save_every == 0 and count < steps_per_epoch:
                part = mean_across_ranks(sums)  # a collective: every rank takes part, rank 0 writes
                if rank == 0:
                    saved = snapshot(epoch)
                    saved.update(epoch_rng=at_start, batch=count, sums=part,
                                 seconds=seconds0 + time.perf_counter() - t0)
                    on_epoch(saved)
        metrics = {k: s / max(count, 1) for k, s in mean_across_ranks(sums).items()}
        metrics.update(epoch=epoch + 1, seconds=seconds0 + time.perf_counter() - t0)
        history.append(metrics)
        if on_epoch is not None and rank == 0:
            on_epoch(snapshot(epoch + 1))
    if average is not None:  # the trained model is the average; the state keeps the raw weights too
        model.load_state_dict(average.weights)
    model.eval()
    final = dict(history[-1]) if history else {}
    final["seconds"] = seconds0 + time.perf_counter() - t0
    final["steps"] = step
    final["samples_per_rank"] = gather_ints(seen)
    return model, final
