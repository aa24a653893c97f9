"""Edit throughput of a trained ANCM on CPU: in memory through the library, and through the CLI.

    python benchmarks/bench_edit.py [--checkpoint checkpoints/backdoor.safetensors] [--n 2000]

Prints edits per second (labeller + feature model + abduction + decoding) and the fit time stored in
the checkpoint. Figures, not asserts.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from cfedit.ancm import ANCM
from cfedit.data import BarMNIST, write_barmnist


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default="checkpoints/backdoor.safetensors")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--cli-n", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = ANCM.load(a.checkpoint)
    setting = model.graph.data["barmnist"]
    ds = BarMNIST(setting, "test", n=a.n, seed=1)
    do = {"color": "red"}
    model.edit(ds.images[:64], do)  # warm-up
    t = time.perf_counter()
    res = model.edit(ds.images, do, seed=0)
    lib = time.perf_counter() - t
    print(f"library, in memory: {a.n} edits in {lib:.2f} s = {a.n / lib:,.0f} edits/s "
          f"(labeller + {model.features.family} feature model + abduction + decoding, {a.threads} threads)")
    t = time.perf_counter()
    model.features.counterfactual(res.factual, model.graph.value_indices(do), seed=0)
    print(f"  of which the feature model: {time.perf_counter() - t:.3f} s")

    with tempfile.TemporaryDirectory() as tmp:
        write_barmnist(setting, a.cli_n, split="test", seed=2, out=Path(tmp) / "in")
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "cfedit", "edit", str(Path(tmp) / "in"), "--set", "color=red",
                        "-c", a.checkpoint, "--out", str(Path(tmp) / "out")], check=True,
                       stdout=subprocess.DEVNULL, env=dict(os.environ))
        cli = time.perf_counter() - t
    n_cli = a.cli_n + 1  # the folder also holds grid.png
    print(f"CLI writing PNG pairs and JSON lines: {n_cli} edits in {cli:.2f} s = {n_cli / cli:,.1f} edits/s "
          f"(including interpreter start-up and model loading)")
    secs = model.info.get("seconds", {})
    print(f"fit time stored in the checkpoint: {secs} (total {sum(secs.values()):.0f} s)")


if __name__ == "__main__":
    main()
