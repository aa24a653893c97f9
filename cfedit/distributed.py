"""Data-parallel training under ``torchrun``: the process group, who writes, and how a job fails.

``cfedit fit`` started by ``torchrun`` (``python -m torch.distributed.run``) runs inside
:func:`process_group`, which joins the group described by the environment torchrun sets (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``): ``gloo`` on
CPU, ``nccl`` on CUDA with one device per local rank (``cuda:LOCAL_RANK`` of the visible devices). It
leaves the group at the end and on error. Started any other way (``WORLD_SIZE`` unset or 1) it is a
one-process job and touches nothing of ``torch.distributed``.

The trainers (:mod:`cfedit.image.train`) read the group through :func:`rank_world` and use the
collectives below; the rule they follow (documented there and in the README): ``batch_size`` is the
global batch, split over the ranks, so a step, the learning rate and the steps per epoch are those of a
single process; rank 0 alone logs, shows progress and writes files; the saved resume state does not
depend on the world size.

A failure on one rank ends the job with one line: the first rank to fail records that it did in the
group's store and lets its error propagate (the CLI prints it as ``cfedit: error: ...``); the ranks
that then fail because a peer is gone (a collective error, or the group's timeout, ``CFEDIT_DIST_TIMEOUT``
seconds, default 600, when a peer hangs) raise :class:`PeerFailed`, which the CLI turns into exit
status 1 without a line of its own — except rank 0 when no rank recorded a failure (a peer killed by a
signal, or one that hangs), which says so in one line.

This module imports torch only inside its functions, so importing it costs nothing.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

#: The key of the group's store where the first failing rank records itself.
FAILED_KEY = "cfedit/failed"
DEFAULT_TIMEOUT_S = 600.0


class PeerFailed(RuntimeError):
    """This rank stopped because another rank of the job failed (or stopped answering).

    ``quiet``: the failing rank has reported the error itself, so this one should exit (status 1)
    without printing anything."""

    def __init__(self, message: str, quiet: bool, code: int = 1):
        super().__init__(message)
        self.quiet, self.code = quiet, code


@dataclass(frozen=True)
class Job:
    """Where this process stands: its rank among ``world`` processes, its local rank on the node, the
    device it trains on and the backend (``None`` for a one-process job)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"
    backend: str | None = None

    @property
    def main(self) -> bool:
        """Rank 0: the one process that logs, shows progress and writes files."""
        return self.rank == 0

    def info(self) -> dict:
        return {"world_size": self.world, "backend": self.backend}


def launched() -> bool:
    """True when started by torchrun (or another launcher) as one of several processes."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def device_for_rank(device: str, local_rank: int, local_world: int) -> str:
    """The device of local rank ``local_rank``: ``cuda`` becomes ``cuda:<local_rank>`` (of the visible
    devices); ``cuda:N`` is kept with one process per node and refused with several (they would share
    one GPU; choose the GPUs with CUDA_VISIBLE_DEVICES); ``cpu`` stays ``cpu``."""
    import torch

    from cfedit.errors import UsageFailure

    d = torch.device(device)
    if d.type != "cuda":
        return str(d)
    count = torch.cuda.device_count()
    if d.index is not None:
        if local_world > 1:
            raise UsageFailure(f"--device {device}: under torchrun with {local_world} processes per node each "
                               "process takes its own GPU; pass --device cuda (pick the GPUs with CUDA_VISIBLE_DEVICES)")
        return str(d)
    if local_rank >= count:
        raise UsageFailure(f"local rank {local_rank} needs GPU {local_rank} but only {count} are visible here "
                           "(start at most as many processes per node as there are GPUs)")
    return f"cuda:{local_rank}"


def _timeout_s() -> float:
    raw = os.environ.get("CFEDIT_DIST_TIMEOUT", "")
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        value = DEFAULT_TIMEOUT_S
    return value if value > 0 else DEFAULT_TIMEOUT_S


@contextlib.contextmanager
def process_group(device: str = "cpu", timeout_s: float | None = None) -> Iterator[Job]:
    """The job this process is part of, for the duration of the block.

    Under a launcher (``WORLD_SIZE`` > 1) it joins the process group (``gloo`` for ``device`` cpu,
    ``nccl`` for cuda, the device of this local rank set current), and leaves it at the end; on an
    error it applies the one-line rule of the module docstring. Otherwise, or when a group already
    exists (a caller that made its own), it only describes the job.
    """
    if not launched():
        yield Job(device=device)
        return
    import datetime

    import torch
    import torch.distributed as dist

    if dist.is_initialized():  # the caller owns the group
        yield Job(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), device,
                  dist.get_backend())
        return
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    dev = device_for_rank(device, local_rank, local_world)
    backend = "nccl" if dev.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(torch.device(dev))
    timeout = datetime.timedelta(seconds=timeout_s or _timeout_s())
    dist.init_process_group(backend, timeout=timeout)
    job = Job(dist.get_rank(), dist.get_world_size(), local_rank, dev, backend)
    failed = False
    try:
        yield job
    except BaseException as e:
        failed = True
        err = _on_error(e, job)
        if err is e:
            raise
        raise err from None
    finally:
        _leave(failed)


def _on_error(e: BaseException, job: Job) -> BaseException:
    """The exception this rank ends with (see the module docstring)."""
    if isinstance(e, PeerFailed):
        return e
    if not isinstance(e, Exception) or not _is_peer_error(e):
        # this rank failed first (or at the same time as others, e.g. all on the same bad input, or all
        # interrupted): the first one to record it reports, the others end quietly
        if _record_failure():
            return e
        return PeerFailed(f"rank {job.rank}: {_first_line(e)}", quiet=True,
                          code=1 if isinstance(e, Exception) else 130)
    if not job.main or _failure_recorded():  # only rank 0 asks the store (hosted on its side)
        return PeerFailed(f"rank {job.rank}: a peer failed ({_first_line(e)})", quiet=True)
    return PeerFailed(f"another process of this {job.world}-process training job failed or stopped answering "
                      f"({_first_line(e)}); see its log and torchrun's report", quiet=False)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def _is_peer_error(e: BaseException) -> bool:
    """An error of a collective or of the group's store: a peer is gone, or did not answer in time."""
    import torch.distributed as dist

    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(
        s in text for s in ("gloo", "Gloo", "NCCL", "Connection closed by peer", "Connection reset by peer",
                            "Timed out", "timed out", "ProcessGroup"))


def _store():
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()


def _record_failure() -> bool:
    """Count this rank's failure in the store; True for the first (or when the store is gone)."""
    try:
        return int(_store().add(FAILED_KEY, 1)) == 1
    except Exception:  # noqa: BLE001 - the store's host is gone: report, better twice than never
        return True


def _failure_recorded() -> bool:
    try:
        return bool(_store().check([FAILED_KEY]))
    except Exception:  # noqa: BLE001 - the store's host (rank 0's side) is gone: it reported, or torchrun does
        return True


def _leave(failed: bool) -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    if failed and dist.get_backend() == "nccl":
        # NCCL work may be stuck on a dead peer: do not wait for it; the process exits next
        abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
        if abort is not None:
            with contextlib.suppress(Exception):
                abort()
        return
    with contextlib.suppress(Exception):
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# What the trainers use (all no-ops in a one-process job)
# --------------------------------------------------------------------------------------------

def rank_world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return rank_world()[0] == 0


def backend() -> str | None:
    import torch.distributed as dist

    return dist.get_backend() if dist.is_available() and dist.is_initialized() else None


def job_info() -> dict:
    """How this run trains, for a checkpoint's info: ``world_size`` and ``backend``."""
    return {"world_size": rank_world()[1], "backend": backend()}


def _collective_device():
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if backend() == "nccl" else torch.device("cpu")


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (pickled between this job's own processes)."""
    if rank_world()[1] == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_collective_device())
    return box[0]


def agree_seed(seed: int) -> int:
    """Rank 0's seed on every rank, so all ranks draw from one seed stream."""
    return int(broadcast_object(int(seed)))


def mean_across_ranks(values: Mapping[str, Any]) -> dict[str, float]:
    """The mean over the ranks of each value (floats or 0-d tensors; the same keys on every rank)."""
    import torch

    keys = list(values)  # the same order on every rank (the same step function filled them)
    if rank_world()[1] == 1 or not keys:
        return {k: float(values[k]) for k in keys}
    import torch.distributed as dist

    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    t = t / rank_world()[1]
    return {k: float(x) for k, x in zip(keys, t.tolist())}


def gather_ints(value: int) -> list[int]:
    """``value`` of every rank, in rank order."""
    import torch

    if rank_world()[1] == 1:
        return [int(value)]
    import torch.distributed as dist

    world = rank_world()[1]
    mine = torch.tensor([int(value)], dtype=torch.long, device=_collective_device())
    out = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(out, mine)
    return [int(t.item()) for t in out]


def shard(batch, rank: int, world: int):
    """Rank ``rank``'s part of a global batch of indices: contiguous, disjoint, sizes differing by at
    most one (all equal when the batch size is a multiple of the world size)."""
    import torch

    return torch.tensor_split(batch, world)[rank]
