"""Edit throughput: the library in memory, the CLI from a PNG folder to PNG pairs plus manifest (the
batched pipeline), the per-image path the CLI had before it for comparison, and faces end to end.

    python benchmarks/bench_edit.py [--threads 1] [--n 2000] [--cli-n 10000] [--per-image-n 200]
                                    [--faces-checkpoint checkpoints/celeba.safetensors] [--faces-n 512]
                                    [--before DIR]

Digits come from BarMNIST (MNIST under $CFEDIT_DATA), faces from $CFEDIT_DATA/faces/celebahq64.
``--before DIR`` also times the ``cfedit edit`` of another source tree (e.g. ``git archive`` of an
earlier commit) on the per-image subset. Figures, not asserts; ``--threads`` sets torch's threads here
and OMP_NUM_THREADS of the CLI processes.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from cfedit.editor import ANCM
from cfedit.files import atomic_write_bytes
from cfedit.data import BarMNIST, write_barmnist
from cfedit.imageio import png_bytes, read_image, side_by_side


def cli_edit(inputs: Path, out: Path, checkpoint: str, do: str, threads: int, tree: str | None = None) -> tuple[float, float | None]:
    """Wall seconds of one ``cfedit edit`` process (start-up and model loading included), and the
    files/s its own summary line reports for the editing alone (None when it prints none). ``tree``:
    run the cfedit of that source tree instead of this one."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if tree:
        env["PYTHONPATH"] = tree
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "cfedit", "edit", str(inputs), "--set", do, "-c", checkpoint,
                        "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                       cwd=tree)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(f"cfedit edit failed ({r.returncode}): {r.stderr.strip()[-300:]}")
    m = re.search(r"([\d,.]+) files/s", r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "")
    return wall, float(m.group(1).replace(",", "")) if m else None


def per_image_path(model: ANCM, paths: list[Path], out: Path, do: dict) -> float:
    """Seconds for the loop the CLI ran before the batched pipeline: per file, decode, one model call
    (same seed for every file), bounds, two atomic PNG writes and a JSON line."""
    g = model.graph
    out.mkdir(parents=True)
    t = time.perf_counter()
    for p in paths:
        img, _ = read_image(p, g.image.size, g.image.channels)
        res = model.edit(img[None], do, seed=0)
        cf = res.images[0, 0]
        atomic_write_bytes(out / f"{p.stem}.cf0.png", png_bytes(cf))
        atomic_write_bytes(out / f"{p.stem}.pair0.png", png_bytes(side_by_side(img, cf)))
        bounds = model.descendant_bounds(res.factual[0], res.do, res.counterfactual[0, 0])
        json.dumps({"input": str(p), "bounds": bounds})
    return time.perf_counter() - t


def face_folder(n: int, out: Path) -> Path | None:
    """The first ``n`` held-out CelebA-HQ faces (64x64) as PNG files, or None without the data."""
    zpath = Path(os.environ.get("CFEDIT_DATA", "../shared/data")) / "faces" / "celebahq64" / "images_64.zip"
    if not zpath.exists():
        return None
    out.mkdir(parents=True)
    with zipfile.ZipFile(zpath) as z:
        names = sorted(x for x in z.namelist() if x.lower().endswith((".png", ".jpg")))[-n:]
        for name in names:
            (out / (Path(name).stem + ".png")).write_bytes(png_bytes(_decode(z.read(name))))
    return out


def _decode(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB")).transpose(2, 0, 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default="checkpoints/backdoor.safetensors")
    ap.add_argument("--n", type=int, default=2000, help="edits in memory through the library")
    ap.add_argument("--cli-n", type=int, default=10000, help="PNG files the batched CLI edits")
    ap.add_argument("--per-image-n", type=int, default=200, help="files the per-image path edits")
    ap.add_argument("--faces-checkpoint", default="checkpoints/celeba.safetensors")
    ap.add_argument("--faces-n", type=int, default=512)
    ap.add_argument("--before", default=None, help="source tree whose cfedit edit to time on the per-image subset")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    ck = str(Path(a.checkpoint).resolve())
    model = ANCM.load(ck)
    setting = model.graph.data["barmnist"]
    do = {"color": "red"}
    print(f"{a.threads} torch thread(s), {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")

    ds = BarMNIST(setting, "test", n=a.n, seed=1)
    model.edit(ds.images[:64], do)  # warm-up
    t = time.perf_counter()
    model.edit(ds.images, do, seed=0, unit_keys=range(a.n))
    lib = time.perf_counter() - t
    t = time.perf_counter()
    model.edit(ds.images, do, seed=0)
    lib_one = time.perf_counter() - t
    print(f"library, in memory: {a.n / lib:,.0f} edits/s with a stream per image, {a.n / lib_one:,.0f} edits/s "
          f"with one stream per call ({a.n} digits; labeller + {model.features.family} feature model + abduction + decoding)")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_barmnist(setting, a.cli_n, split="test", seed=2, out=tmp / "in")
        n_files = a.cli_n + 1  # the folder also holds grid.png
        wall, rate = cli_edit(tmp / "in", tmp / "out", ck, "color=red", a.threads)
        lines = len((tmp / "out" / "edits.jsonl").read_text().splitlines())
        print(f"CLI, batched: {n_files} PNG files -> pairs + manifest ({lines} records): {n_files / wall:,.1f} files/s "
              f"end to end in {wall:.1f} s (start-up and model loading included); {rate:,.1f} files/s editing")

        paths = sorted((tmp / "in").glob("*.png"))[:a.per_image_n]
        sub = tmp / "sub"
        sub.mkdir()
        for p in paths:
            (sub / p.name).write_bytes(p.read_bytes())
        secs = per_image_path(model, paths, tmp / "per_image", do)
        print(f"per-image path (the CLI's loop before batching, in process): {len(paths) / secs:,.1f} files/s; "
              f"batched CLI editing / per-image: {rate / (len(paths) / secs):,.1f}x")
        if a.before:
            before = str(Path(a.before).resolve())
            wall_b, _ = cli_edit(sub, tmp / "out_before", ck, "color=red", a.threads, tree=before)
            wall_n, _ = cli_edit(sub, tmp / "out_now", ck, "color=red", a.threads)
            print(f"CLI of {before} on {len(paths)} files: {len(paths) / wall_b:,.1f} files/s end to end; "
                  f"this CLI on the same files: {len(paths) / wall_n:,.1f} files/s ({wall_b / wall_n:,.1f}x, "
                  f"start-up and model loading included in both)")

        faces = face_folder(a.faces_n, tmp / "faces")
        if faces is None:
            print("faces: skipped ($CFEDIT_DATA/faces/celebahq64/images_64.zip is absent)")
        else:
            fck = str(Path(a.faces_checkpoint).resolve())
            for edit in ("age=old", "smiling=yes"):
                try:
                    wall, rate = cli_edit(faces, tmp / f"faces_{edit}", fck, edit, a.threads)
                except RuntimeError as e:
                    print(f"faces (64x64, {Path(fck).name}): {e}")
                    break
                print(f"faces (64x64, {Path(fck).name}), --set {edit}: {a.faces_n / wall:,.1f} files/s end to end "
                      f"in {wall:.1f} s; {rate:,.1f} files/s editing")
    secs = model.info.get("seconds", {})
    print(f"fit time stored in the checkpoint: {secs} (total {sum(secs.values()):.0f} s)")


if __name__ == "__main__":
    main()
