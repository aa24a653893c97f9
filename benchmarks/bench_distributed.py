"""Data-parallel training throughput: samples/s of the image mechanism's training (the default CVAE
with its attribute loss, backdoor graph, 28 px, global batch 128) on 1 and 2 CPU processes (gloo, one
thread each), and on CUDA (nccl, one process per GPU) when there is one.

    python benchmarks/bench_distributed.py                 # 1 and 2 CPU processes, then CUDA if present
    python benchmarks/bench_distributed.py --samples 4096 --procs 1,2,4

Each setting runs in fresh processes (two via ``torch.distributed.run``); the first global batches are
a warm-up and not timed. Prints one line per setting and the ratio to one process; asserts nothing.
On a shared machine the figures move with whatever else runs there.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class Synthetic:
    """Random uint8 images [n, 3, 28, 28] and factors of the backdoor graph (array fast path)."""

    def __init__(self, n: int, sizes, seed: int = 0):
        import numpy as np

        rng = np.random.default_rng(seed)
        self.images = rng.integers(0, 256, (n, 3, 28, 28), dtype=np.uint8)
        self.factors = np.stack([rng.integers(0, s, n) for s in sizes], 1).astype(np.int64)

    def __len__(self):
        return len(self.factors)


def worker(args) -> None:
    """One process of a setting: train, time the steps after the warm-up, rank 0 prints JSON."""
    import torch

    from cfedit import distributed
    from cfedit.causal.graph_file import load_graph
    from cfedit.image import Labeller, train_image_mechanism

    torch.set_num_threads(args.threads)
    with distributed.process_group(args.device) as job:
        g = load_graph("backdoor")
        ds = Synthetic(args.samples, [len(g[v].values) for v in g.names])
        lab = Labeller.for_graph(g, width=32, hidden=128)
        marks: list[float] = []

        def progress(step, total, metrics):  # rank 0, every 10 steps and at the epoch's end
            marks.append((step, time.perf_counter()))

        dev = torch.device(job.device)
        from cfedit.image import train as tr

        tr.LOG_EVERY = 1  # a mark at every step
        train_image_mechanism(ds, g, lab, epochs=1, device=dev, seed=0, progress=progress, batch_size=args.batch)
        if job.main:
            (s0, t0), (s1, t1) = marks[args.warmup - 1], marks[-1]
            print(json.dumps({"world": job.world, "device": job.device, "backend": job.backend,
                              "samples_per_s": (s1 - s0) * args.batch / (t1 - t0), "steps_timed": s1 - s0}))


def run_setting(procs: int, device: str, args) -> dict | None:
    me = [str(Path(__file__).resolve()), "--worker", "--device", device, "--samples", str(args.samples), "--batch",
          str(args.batch), "--threads", str(args.threads), "--warmup", str(args.warmup)]
    cmd = [sys.executable, *me] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs), *me]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads),
               PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
    if r.returncode != 0 or not lines:
        print(f"  {procs} x {device}: failed (exit {r.returncode}): {r.stderr.strip().splitlines()[-1:]}")
        return None
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--samples", type=int, default=3072, help="training samples (one epoch)")
    ap.add_argument("--batch", type=int, default=128, help="global batch")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--warmup", type=int, default=3, help="global batches not timed")
    ap.add_argument("--procs", default="1,2", help="CPU process counts")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    import torch

    print(f"image mechanism training, backdoor 28 px, global batch {args.batch}, {args.samples} samples, "
          f"{args.threads} thread(s) per process, {os.cpu_count()} CPU cores")
    settings = [(int(p), "cpu") for p in args.procs.split(",")]
    if torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        settings += [(1, "cuda")] + ([(gpus, "cuda")] if gpus > 1 else [])
    else:
        print("  no CUDA device here: GPU settings skipped")
    base: dict[str, float] = {}
    for procs, device in settings:
        res = run_setting(procs, device, args)
        if res is None:
            continue
        sps = res["samples_per_s"]
        base.setdefault(device, sps)
        print(f"  {procs} process(es) on {device:4s} ({res['backend'] or 'no group'}): {sps:8.1f} samples/s  "
              f"ratio to 1 process {sps / base[device]:.2f}  ({res['steps_timed']} steps timed)")


if __name__ == "__main__":
    main()
