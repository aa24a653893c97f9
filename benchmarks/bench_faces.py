"""The faces bars, measured side by side for one or more face checkpoints in one eval run.

    python benchmarks/bench_faces.py [CHECKPOINT ...] [--n-metrics 3000] [--out runs/bench-faces]

For each checkpoint (default: the shipped one) on the 3,000 held-out CelebA-HQ faces, read by eval's
independent reader: effectiveness of do(age=old) on young faces and of do(gray_hair=yes) /
do(eyeglasses=yes) relative to the real rate; KID and FID of those edits and of their unedited inputs
against real held-out faces with the new value (reader feature space); where the change lies (the
boxes below); what age edits keep; the gray share of aged young faces per gender against the bounds
as the reader shows them; the null edit; faces per second through the library; and the gray-hair
edits read per factual age beside real gray-haired faces of that age (``gray_by_age`` and
``real_gray_by_age``: the reader reads real gray hair on old faces far more often than on young
ones, and most edited faces are young, so the pooled ratio mixes the two; ``gray_ratio_attainable``:
the pooled ratio of an edit read gray as often as real gray hair at each age); and the KIDs within a
factor the edit keeps (``age_kid_by_gender``, ``gray_kid_by_age``, ``glasses_kid_by_gender``: see
:func:`kid_within`). Writes ``grid.png``
under ``--out`` (held-out faces x {input, age, gray hair, glasses, smile}; CelebA pictures: never
commit them) and ``bars.json``. Figures, not asserts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch

import cfedit.eval.metrics as M
from cfedit.eval import evaluate, load_models, load_or_train_reader, write_edit_grid
from cfedit.causal.graph_file import load_graph, shipped_dir

#: Boxes of the aligned 64x64 CelebA-HQ crop, (x0, y0, x1, y1) half-open, found on the mean held-out
#: face: the eyes sit on rows 26-33 between columns 18 and 46, the mouth on rows 42-48.
EYE_BAND = (12, 20, 52, 40)  # the upper-middle band: eyes, brows and where frames sit
FACE_CENTRE = (20, 24, 44, 52)  # eyes, nose and mouth
GRID_EDITS = (("age", None), ("gray_hair", "yes"), ("eyeglasses", "yes"), ("smiling", None))


def bars(report, model: str) -> dict:
    mm = next(m for m in report.metrics if m.model == model)
    var = {v.variable: v for v in mm.variables}
    out: dict = {}
    for name, value in (("age", "old"), ("gray_hair", "yes"), ("eyeglasses", "yes")):
        ve = var[name].by_value[value]
        out[f"{name}={value}"] = {
            "effectiveness": ve.effectiveness, "real_rate": ve.real_rate, "ratio": ve.ratio,
            "kid": ve.kid, "kid_input": ve.kid_input, "fid": ve.fid, "fid_input": ve.fid_input,
            "n_edits": ve.n_units, "n_reference": ve.n_reference,
            "eye_band_share": M.change_share(ve.change_map, EYE_BAND),
            "face_centre_share": M.change_share(ve.change_map, FACE_CENTRE), "mean_change": ve.change}
    out["age_kept"] = var["age"].kept
    out["age_kept_ceiling"] = var["age"].kept_ceiling
    out["null_edit_mae"] = mm.composition["1"]
    for q in report.queries:
        r = next((e for e in q.results if e.model == model), None)
        if r is not None and q.name.startswith("gray_if_old"):
            out[q.name] = {"value": r.value, "ci": [r.lower, r.upper], "bounds": [q.lower, q.upper],
                           "as_read": [q.reader_lower, q.reader_upper],
                           "verdict_reader": r.verdict_reader.label if r.verdict_reader else None}
    return out


def rate_by_age(hits: np.ndarray, ages: np.ndarray, graph) -> dict:
    """Per age value: how many faces, the share of ``hits`` among them and its Wilson interval."""
    out = {}
    for code, age in enumerate(graph["age"].values):
        h = hits[ages == code]
        out[age] = {"n": len(h), "rate": float(h.mean()) if len(h) else None,
                    "ci": M.wilson_interval(float(h.sum()), len(h)) if len(h) else None}
    return out


def gray_by_age(model, reader, test, n: int = 600, seed: int = 0) -> dict:
    """Per factual age, the reader's gray rate on do(gray_hair=yes) edits of the first ``n`` held-out
    non-gray faces (compare with ``real_gray_by_age``)."""
    g = model.graph
    h, f = g.axis("gray_hair"), test.factors
    rows = np.flatnonzero(f[:, h] == 0)[:n]
    edited = model.edit(test.images[rows], {"gray_hair": "yes"}, factual=f[rows], seed=seed).images[:, 0]
    return rate_by_age(reader.read(edited)[:, h] == 1, f[rows, g.axis("age")], g)


def real_gray_by_age(reader, test, graph) -> dict:
    """Per age, the reader's gray rate on the real held-out gray-haired faces."""
    h, f = graph.axis("gray_hair"), test.factors
    real = np.flatnonzero(f[:, h] == 1)
    return rate_by_age(reader.read(test.images[real])[:, h] == 1, f[real, graph.axis("age")], graph)


def attainable_gray_ratio(edited_by_age: dict, real_by_age: dict) -> float | None:
    """The pooled gray ratio of an edit whose faces the reader reads gray exactly as often as real
    gray-haired faces of their own age: sum over ages of (the edits' share of that age x the real rate
    at that age) / the real pooled rate. do(gray_hair=yes) keeps the age, most edited faces are young,
    and the reader reads real gray hair on young faces far less often than on old ones, so this is
    the most the pooled ratio can show for an edit that draws gray hair as real as it comes."""
    n = sum(v["n"] for v in edited_by_age.values())
    real_n = sum(v["n"] for v in real_by_age.values())
    if not n or not real_n or any(v["n"] and real_by_age[a]["rate"] is None for a, v in edited_by_age.items()):
        return None
    pooled = sum(v["n"] * v["rate"] for v in real_by_age.values() if v["n"]) / real_n
    best = sum(v["n"] / n * real_by_age[a]["rate"] for a, v in edited_by_age.items() if v["n"])
    return best / pooled if pooled else None


def kid_within(model, reader, test, variable: str, value: str, within: str, n: int = 600, seed: int = 0,
               least: int = 20) -> dict:
    """Per value of ``within``, a factor the edit keeps: KID (and FID) of do(variable=value) edits of
    the first ``n`` held-out faces without the value, and of their unedited inputs, against the real
    held-out faces that have the value and the same value of ``within``. The pooled figures of eval
    compare edits of mostly young women with real old faces that are two-thirds men, so they reward
    an age edit that also makes a face male; within gender they do not. A stratum with fewer than
    ``least`` edits or real faces gets its counts only."""
    g, f = model.graph, test.factors
    j, k, target = g.axis(variable), g.axis(within), g[variable].as_index(value)
    rows = np.flatnonzero(f[:, j] != target)[:n]
    edited = model.edit(test.images[rows], {variable: value}, factual=f[rows], seed=seed).images[:, 0]
    f_edit, f_input = reader.features(edited), reader.features(test.images[rows])
    out = {}
    for code, name in enumerate(g[within].values):
        mine, real = f[rows, k] == code, np.flatnonzero((f[:, j] == target) & (f[:, k] == code))
        out[name] = {"n": int(mine.sum()), "n_reference": len(real)}
        if mine.sum() >= least and len(real) >= least:
            ref = reader.features(test.images[real])
            out[name].update(kid=M.kernel_distance(ref, f_edit[mine]), kid_input=M.kernel_distance(ref, f_input[mine]),
                             fid=M.frechet_distance(ref, f_edit[mine]), fid_input=M.frechet_distance(ref, f_input[mine]))
    return out


def reader_identity(reader) -> dict:
    """Which reader weights read these figures: the same reader recipe trained on another machine
    gives other weights (float kernels differ), and its figures differ in the second decimal."""
    info = reader.info
    path = Path(info.path) if info and info.path else None
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path and path.exists() else None
    return {"path": str(path) if path else None, "sha256": digest,
            "test_accuracy": dict(info.test_accuracy) if info else None}


def throughput(model, images: np.ndarray, repeats: int = 2) -> float:
    model.edit(images[:32], {"age": "old"})  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        model.edit(images, {"age": "old"}, seed=0)
        best = min(best, time.perf_counter() - t)
    return len(images) / best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoints", nargs="*", default=[str(shipped_dir("checkpoints") / "celeba.safetensors")])
    ap.add_argument("--n", type=int, default=2000, help="units per query")
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--n-metrics", type=int, default=3000)
    ap.add_argument("--grid", type=int, default=32, help="held-out faces in grid.png")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/bench-faces")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    g = load_graph("celeba")
    reader = load_or_train_reader(g)
    models = load_models(a.checkpoints, g)
    t = time.perf_counter()
    report = evaluate(g, models, n=a.n, samples=a.samples, n_metrics=a.n_metrics, reader=reader)
    print(f"eval of {len(models)} model(s): {time.perf_counter() - t:.0f} s")
    from cfedit.data import dataset_for_graph

    test = dataset_for_graph(g, "test", None, 0)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"reader": reader_identity(reader), "boxes": {"eye_band": EYE_BAND, "face_centre": FACE_CENTRE},
              "real_gray_by_age": real_gray_by_age(reader, test, g), "models": {}}
    for name, m in models.items():
        b = bars(report, name)
        b["faces_per_s_library"] = throughput(m, test.images[:512])
        b["gray_by_age"] = gray_by_age(m, reader, test)
        b["gray_ratio_attainable"] = attainable_gray_ratio(b["gray_by_age"], result["real_gray_by_age"])
        b["age_kid_by_gender"] = kid_within(m, reader, test, "age", "old", "gender")
        b["gray_kid_by_age"] = kid_within(m, reader, test, "gray_hair", "yes", "age")
        b["glasses_kid_by_gender"] = kid_within(m, reader, test, "eyeglasses", "yes", "gender")
        result["models"][name] = b
        write_edit_grid(m, test.images[:a.grid], test.factors[:a.grid], GRID_EDITS, out / f"grid-{name}.png",
                        scale=3)
    (out / "bars.json").write_text(json.dumps(result, indent=2, default=float))
    print(json.dumps(result, indent=2, default=lambda x: round(float(x), 4)))


if __name__ == "__main__":
    main()
