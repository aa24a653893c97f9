"""What the faces reader calls gray hair: held-out faces grayed by hand, read by eval's reader.

    python benchmarks/bench_gray_reader.py [--n 600] [--threads 2]

No trained editor is involved, so nothing here can have learnt to please the reader. The first 600
held-out faces without gray hair are grayed by hand inside a region of the aligned crop (each pixel's
gray raised by ``lift`` logits and its colour removed: the editor's luma layer at full desaturation,
blended in through the region) and read; the figures are the share read as gray hair, per factual age,
beside the reader's rate on the real held-out gray-haired faces of each age. Regions: the gray-hair
gate at the editor's level (0.5) and at lower levels (wider), that gate dilated, and the top half of
the picture. Figures, not asserts; docs/faces.md reads them.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from torch.nn import functional as F

from cfedit.causal.graph_file import load_graph
from cfedit.data import dataset_for_graph
from cfedit.eval import load_or_train_reader
from cfedit.image.editor import MaskedEditor, gate_opening
from cfedit.image.masked_training import attribute_regions

from bench_faces import real_gray_by_age  # this folder is on the path when run as a script


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=600, help="held-out faces without gray hair to gray")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    g = load_graph("celeba")
    reader = load_or_train_reader(g)
    test, train = dataset_for_graph(g, "test"), dataset_for_graph(g, "train")
    age, gray = g.axis("age"), g.axis("gray_hair")
    f = test.factors

    def read_gray(images: np.ndarray) -> float:
        return float((reader.read(images)[:, gray] == 1).mean()) if len(images) else float("nan")

    for name, r in real_gray_by_age(reader, test, g).items():
        print(f"real gray-haired {name} faces: {r['n']}, read gray {r['rate']:.3f}")
    rows = np.flatnonzero(f[:, gray] == 0)[:a.n]
    young = f[rows, age] == g["age"].values.index("young")
    x = torch.from_numpy(test.images[rows]).float() / 255
    print(f"the {len(rows)} inputs ({int(young.sum())} young): read gray {read_gray(test.images[rows]):.3f}")
    region = attribute_regions(train, g.shape)[gray]
    dilated = {d: F.max_pool2d(region[None, None], 2 * d + 1, 1, d)[0, 0] for d in (3, 6)}
    variants = [(f"gate at level {lv}", gate_opening(region, lv)) for lv in (0.5, 0.3, 0.2)]
    variants += [(f"gate dilated {d} px", gate_opening(m, 0.5)) for d, m in dilated.items()]
    variants += [("top half", (torch.arange(64)[:, None] < 32).float().expand(64, 64))]
    print(f"{'region':<22}{'open':>6}{'lift':>6}{'all':>8}{'young':>8}{'old':>8}")
    for name, gate in variants:
        for lift in (1.0, 2.0):
            grayed = MaskedEditor._luma_colour(x, torch.full_like(x[:, :1], lift), torch.full_like(x[:, :1], 20.0))
            edit = ((x + gate[None, None] * (grayed - x)) * 255).round().clamp(0, 255).to(torch.uint8).numpy()
            print(f"{name:<22}{float((gate > 0).float().mean()):>6.2f}{lift:>6.1f}{read_gray(edit):>8.3f}"
                  f"{read_gray(edit[young]):>8.3f}{read_gray(edit[~young]):>8.3f}")


if __name__ == "__main__":
    main()
