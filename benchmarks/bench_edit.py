"""Edit throughput: the library in memory, a file-level run from a PNG folder to PNG pairs plus manifest
(the batched pipeline of ``cfedit edit``), the per-image path the CLI had before it for comparison, and faces end to end.

    python benchmarks/bench_edit.py [--threads 1] [--n 2000] [--cli-n 10000] [--per-image-n 200]
                                    [--faces-checkpoint checkpoints/celeba.safetensors] [--faces-n 512]

Digits come from BarMNIST (MNIST under $CFEDIT_DATA), faces from $CFEDIT_DATA/faces/celebahq64. The
file-level runs call :func:`cfedit.editor.run.edit_images`, the function behind ``cfedit edit``, in
this process (start-up of the interpreter is not counted). Figures, not asserts; ``--threads`` sets
torch's threads.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from cfedit.causal.query import parse_assignments
from cfedit.editor import ANCM
from cfedit.editor.run import edit_images
from cfedit.errors import CfeditError
from cfedit.files import atomic_write_bytes
from cfedit.data import BarMNIST, write_barmnist
from cfedit.imageio import png_bytes, read_image, side_by_side


def file_edit(inputs: Path, out: Path, checkpoint: str, do: str) -> tuple[float, float]:
    """Wall seconds of one file-level edit run (:func:`cfedit.editor.run.edit_images`, what ``cfedit edit``
    calls; model loading included), and the files/s of the editing alone."""
    t = time.perf_counter()
    summary = edit_images([inputs], parse_assignments(do, "--set"), out, checkpoint=checkpoint)
    wall = time.perf_counter() - t
    return wall, summary.edited / max(summary.seconds, 1e-9)


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
    ap.add_argument("--cli-n", type=int, default=10000, help="PNG files the batched file-level run edits")
    ap.add_argument("--per-image-n", type=int, default=200, help="files the per-image path edits")
    ap.add_argument("--faces-checkpoint", default="checkpoints/celeba.safetensors")
    ap.add_argument("--faces-n", type=int, default=512)
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
        wall, rate = file_edit(tmp / "in", tmp / "out", ck, "color=red")
        lines = len((tmp / "out" / "edits.jsonl").read_text().splitlines())
        print(f"file-level, batched: {n_files} PNG files -> pairs + manifest ({lines} records): {n_files / wall:,.1f} "
              f"files/s end to end in {wall:.1f} s (model loading included); {rate:,.1f} files/s editing")

        paths = sorted((tmp / "in").glob("*.png"))[:a.per_image_n]
        secs = per_image_path(model, paths, tmp / "per_image", do)
        print(f"per-image path (the CLI's loop before batching): {len(paths) / secs:,.1f} files/s; "
              f"batched editing / per-image: {rate / (len(paths) / secs):,.1f}x")

        faces = face_folder(a.faces_n, tmp / "faces")
        if faces is None:
            print("faces: skipped ($CFEDIT_DATA/faces/celebahq64/images_64.zip is absent)")
        else:
            fck = str(Path(a.faces_checkpoint).resolve())
            for edit in ("age=old", "smiling=yes"):
                try:
                    wall, rate = file_edit(faces, tmp / f"faces_{edit}", fck, edit)
                except CfeditError as e:
                    print(f"faces (64x64, {Path(fck).name}): {e}")
                    break
                print(f"faces (64x64, {Path(fck).name}), --set {edit}: {a.faces_n / wall:,.1f} files/s end to end "
                      f"in {wall:.1f} s; {rate:,.1f} files/s editing")
    secs = model.info.get("seconds", {})
    print(f"fit time stored in the checkpoint: {secs} (total {sum(secs.values()):.0f} s)")


if __name__ == "__main__":
    main()
