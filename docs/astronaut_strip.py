"""Regenerate docs/astronaut_edits.png from the shipped face model (the example face only: no CelebA
image, or picture made from one, ever goes into the repository).

    python docs/astronaut_strip.py [--checkpoint checkpoints/celeba.safetensors] [--out docs/astronaut_edits.png]

Columns, each at the photo's own 128-px resolution (the 64-px change upsampled onto it, as
``cfedit edit --keep-size`` writes it): the input; do(age=old) without and with gray hair (the first
sample of each kind among 64 draws of the causal model); do(gray_hair=yes); do(eyeglasses=yes);
do(smiling=no). Prints the factual reading and, for age, how many of the 64 samples turned gray.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
from PIL import Image

from cfedit.editor import ANCM
from cfedit.files import atomic_write_bytes
from cfedit.causal.graph_file import shipped_dir
from cfedit.imageio import apply_change, read_image, read_original, side_by_side

FACE = Path(__file__).resolve().parents[1] / "examples" / "astronaut_face.png"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default=str(shipped_dir("checkpoints") / "celeba.safetensors"))
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "astronaut_edits.png"))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    model = ANCM.load(a.checkpoint)
    g = model.graph
    img, _ = read_image(FACE, g.image.size, g.image.channels)
    full = read_original(FACE, g.image.channels)
    aged = model.edit(img[None], {"age": "old"}, n_samples=64, seed=a.seed)
    gray = aged.counterfactual[0, :, g.axis("gray_hair")] == 1
    print("factual:", {n: g[n].values[int(v)] for n, v in zip(g.names, aged.factual[0])})
    print(f"do(age=old): {int(gray.sum())} of 64 samples turn the hair gray")
    picks = [aged.images[0, int(np.flatnonzero(~gray)[0])]]
    if gray.any():
        picks.append(aged.images[0, int(np.flatnonzero(gray)[0])])
    for do in ({"gray_hair": "yes"}, {"eyeglasses": "yes"}, {"smiling": "no"}):
        picks.append(model.edit(img[None], do, seed=a.seed).images[0, 0])
    strip = side_by_side(full, *[apply_change(full, img, p) for p in picks], pad=0)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(strip.transpose(1, 2, 0))).save(buf, format="PNG")
    atomic_write_bytes(a.out, buf.getvalue())
    print(f"wrote {a.out} ({len(picks) + 1} columns)")


if __name__ == "__main__":
    main()
