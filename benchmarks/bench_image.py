"""Image mechanism + labeller on BarMNIST: train with the defaults (or load), then measure the bars.

    python benchmarks/bench_image.py                       # train both settings, measure, print
    python benchmarks/bench_image.py --save runs/img       # ... and keep the models
    python benchmarks/bench_image.py --load runs/img       # measure saved models only
    python benchmarks/bench_image.py --settings backdoor --epochs-mech 3 --n-train 20000

Bars (2,000 test-split images per setting): effectiveness (the intervened factor shows its new value:
color/bar by the pixel oracles, digit by a digit reader trained separately from the labeller),
preservation (the other factors are read as before), composition (null-edit MAE), style (do(color)
edits vs the ground-truth counterfactual on rows 4-27, backdoor), labeller test accuracy, training
time and edits/s. ``measure()`` is importable for ``cfedit eval``. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from cfedit.checkpoint import load_checkpoint, save_checkpoint
from cfedit.data import BarMNIST, oracle_bar, oracle_color
from cfedit.causal.graph_file import graph_from_dict
from cfedit.image import ImageMechanism, Labeller, train_image_mechanism, train_labeller

BARS = {"effect_color": 0.99, "effect_bar": 0.99, "effect_digit": 0.95, "preserve": 0.99, "null_mae": 0.02,
        "style_mae": 0.025, "acc_digit": 0.985, "acc_color": 0.995, "acc_bar": 0.995, "train_s": 480}
READER = {"width": 24, "hidden": 96, "shift": 2}


class DigitReader:
    """The separate digit classifier that judges digit edits: another input (the ink, max of the red and
    green channels, 1 channel — colour-blind by construction, so a recolour cannot change its reading),
    another width, seed and draw of training units than the labeller."""

    def __init__(self, model: Labeller):
        self.model = model

    @staticmethod
    def ink(images) -> np.ndarray:
        x = np.asarray(images)
        return x[:, :2].max(axis=1, keepdims=True)

    def predict(self, images) -> np.ndarray:
        return self.model.predict(self.ink(images))[:, 0]

    @classmethod
    def train(cls, ds: BarMNIST, seed: int = 1, epochs: int | None = None) -> DigitReader:
        class Ink:
            graph = ds.graph
            images = cls.ink(ds.images)
            factors = ds.factors[:, [ds.graph.axis("digit")]]

            def __len__(self):
                return len(self.factors)

        ink_graph = graph_from_dict({"name": "ink", "variables": {"digit": list(ds.graph["digit"].values)},
                                     "image": {"channels": 1, "size": ds.graph.image.size}})
        trained, _ = train_labeller(Ink(), ink_graph, epochs=epochs, seed=seed, **READER)
        return cls(trained)


def random_other(values: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A value index different from each of ``values``, uniformly among the others."""
    return (values + rng.integers(1, size, len(values))) % size


def read(images, reader: DigitReader, graph) -> dict[str, np.ndarray]:
    """Factors read off images: color and bar by the pixel oracles, digit by ``reader``."""
    return {"digit": reader.predict(images),
            "color": oracle_color(images), "bar": oracle_bar(images)}


def measure(ds: BarMNIST, labeller: Labeller, mech: ImageMechanism, reader: DigitReader, seed: int = 0) -> dict:
    """All image-level bars on data set ``ds`` (a test split). Returns a flat dict of floats.

    Preservation ``preserve_<other>_under_<edited>``: the other factor, read off the edit, equals its
    factual value; ``keep_...``: it is read as the same reader reads it off the input (the pure
    image-level check; capped by the reader's own errors).
    """
    g = ds.graph
    rng = np.random.default_rng(seed)
    x = ds.images
    out: dict[str, float] = {}
    # labeller accuracy, and the factual factors the editor would use
    pred = labeller.predict(x)
    for j, name in enumerate(g.names):
        out[f"acc_{name}"] = float((pred[:, j] == ds.factors[:, j]).mean())
    out["reader_acc_digit"] = float((reader.predict(x) == ds.factors[:, g.axis("digit")]).mean())
    before = read(x, reader, g)
    # the mechanism's own bars use the true factual factors; "e2e_" repeats them with the factors the
    # labeller reads (what the editor does), so labeller errors show up there
    for prefix, factual in (("", ds.factors), ("e2e_", pred)):
        u = mech.abduct(x, factual)
        null = mech.decode(factual, u)  # composition: the null edit reproduces the input
        out[prefix + "null_mae"] = float(np.abs(null - x.astype(np.float32) / 255).mean())
        worst_keep = 1.0
        for j, name in enumerate(g.names):  # effectiveness and preservation, one factor at a time
            cf = factual.copy()
            cf[:, j] = random_other(factual[:, j], g.variables[j].size, rng)
            after = read(mech.decode(cf, u), reader, g)
            out[f"{prefix}effect_{name}"] = float((after[name] == cf[:, j]).mean())
            for k, other in enumerate(g.names):
                if other != name:
                    kept = float((after[other] == factual[:, k]).mean())
                    out[f"{prefix}preserve_{other}_under_{name}"] = kept
                    out[f"{prefix}keep_{other}_under_{name}"] = float((after[other] == before[other]).mean())
                    worst_keep = min(worst_keep, kept)
        out[prefix + "preserve"] = worst_keep
    u = mech.abduct(x, ds.factors)
    # style: do(color) vs the ground-truth counterfactual, digit rows 4-27
    ca = g.axis("color")
    errs = []
    for target in range(g["color"].size):
        idx = np.flatnonzero(ds.factors[:, ca] != target)
        gt_f, gt_x = ds.counterfactual(idx, {"color": target})
        gen = mech.decode(gt_f, u[idx])
        errs.append(np.abs(gen[:, :, 4:] - gt_x[:, :, 4:].astype(np.float32) / 255).mean(axis=(1, 2, 3)))
    out["style_mae"] = float(np.concatenate(errs).mean())
    # throughput: read + abduct + decode, in memory
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        v = labeller.predict(x)
        cf = v.copy()
        cf[:, ca] = 1 - cf[:, ca]
        mech.edit(x, v, cf)
        best = min(best, time.perf_counter() - t)
    out["edits_per_s"] = len(x) / best
    return out


def train_setting(setting: str, args) -> tuple[Labeller, ImageMechanism, Labeller, dict]:
    train = BarMNIST(setting, "train", n=args.n_train, seed=0, root=args.root)
    g = train.graph
    times = {}

    def bar(tag):
        last = [0.0]

        def cb(step, total, m):
            now = time.perf_counter()
            if now - last[0] > 20 or step == total:
                last[0] = now
                shown = ", ".join(f"{k}={v:.4g}" for k, v in m.items())
                print(f"  [{setting} {tag}] {step}/{total} {shown}", file=sys.stderr, flush=True)
        return cb

    t = time.perf_counter()
    lab, _ = train_labeller(train, g, epochs=args.epochs_labeller, seed=0, progress=bar("labeller"))
    times["train_labeller_s"] = time.perf_counter() - t
    t = time.perf_counter()
    mech, _ = train_image_mechanism(train, g, lab, epochs=args.epochs_mech, seed=0, progress=bar("mechanism"))
    times["train_mech_s"] = time.perf_counter() - t
    times["train_s"] = times["train_labeller_s"] + times["train_mech_s"]
    # the separate digit reader: another architecture width, seed and draw of the training units
    reader_data = BarMNIST(setting, "train", n=args.n_train, seed=1, root=args.root)
    t = time.perf_counter()
    reader = DigitReader.train(reader_data, seed=1, epochs=args.epochs_labeller)
    times["train_reader_s"] = time.perf_counter() - t
    return lab, mech, reader, times


def save(path: Path, setting: str, lab, mech, reader, graph) -> None:
    for tag, model in (("labeller", lab), ("mechanism", mech), ("reader", reader.model)):
        save_checkpoint(path / f"{setting}_{tag}.safetensors", model.state_dict(), graph, model.config())


def load(path: Path, setting: str):
    models = []
    for tag, cls in (("labeller", Labeller), ("mechanism", ImageMechanism), ("reader", Labeller)):
        ck = load_checkpoint(path / f"{setting}_{tag}.safetensors")
        m = cls.from_config(ck.config)
        m.load_state_dict(ck.tensors)
        models.append(m.eval())
    models[2] = DigitReader(models[2])
    return models


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=["backdoor", "frontdoor"])
    p.add_argument("--load", type=Path, help="folder of <setting>_{labeller,mechanism,reader}.safetensors")
    p.add_argument("--save", type=Path, help="folder to save the trained models to")
    p.add_argument("--n-train", type=int, default=60000)
    p.add_argument("--n-test", type=int, default=2000)
    p.add_argument("--epochs-labeller", type=int, default=None)
    p.add_argument("--epochs-mech", type=int, default=None)
    p.add_argument("--threads", type=int, default=int(os.environ.get("CFEDIT_THREADS", os.cpu_count() or 1)))
    shared = Path(__file__).resolve().parents[2] / "shared" / "data"
    p.add_argument("--root", default=None if os.environ.get("CFEDIT_DATA") or not shared.is_dir() else str(shared),
                   help="MNIST root (default: $CFEDIT_DATA, else ../shared/data, else the user cache)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {}
    for setting in args.settings:
        if args.load:
            lab, mech, reader = load(args.load, setting)
            times = {}
        else:
            lab, mech, reader, times = train_setting(setting, args)
        test = BarMNIST(setting, "test", n=args.n_test, seed=0, root=args.root)
        if args.save:
            save(args.save, setting, lab, mech, reader, test.graph)
        results[setting] = {**measure(test, lab, mech, reader), **times}
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"threads={args.threads} load={os.getloadavg()[0]:.2f}")
    for setting, r in results.items():
        print(f"== {setting}")
        for k, v in r.items():
            bar = BARS.get(k.removeprefix("e2e_"))
            mark = ""
            if bar is not None:
                ok = v <= bar if k.endswith(("mae", "_s")) else v >= bar
                mark = f"   bar {'<=' if k.endswith(('mae', '_s')) else '>='} {bar}  {'ok' if ok else 'MISS'}"
            print(f"  {k:32s} {v:10.4f}{mark}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
