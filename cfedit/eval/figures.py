"""Pictures of an evaluation, drawn with PIL: the bounds chart, the grid of example edits, edit grids.

:func:`write_chart`: one panel per query, the bounds as a shaded bar, the true value, each model's
estimate with its interval. :func:`write_grid`: per query, example units and each model's edit.
:func:`write_edit_grid`: any model's edits of a few images under a list of interventions.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cfedit.eval.report import EvalReport, QueryReport
from cfedit.files import atomic_write_bytes


def _save_png(img, path: str | Path) -> Path:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


def _font(size: int = 12):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _text_width(draw, text: str, font) -> int:
    l, _, r, _ = draw.textbbox((0, 0), text, font=font)
    return r - l


def _fit_text(draw, text: str, font, width: int) -> str:
    if _text_width(draw, text, font) <= width:
        return text
    while text and _text_width(draw, text + "…", font) > width:
        text = text[:-1]
    return text + "…"


COLORS = {"inside": (30, 140, 60), "outside": (200, 40, 40), "none": (90, 90, 90), "bounds": (190, 215, 240),
          "truth": (0, 0, 0), "grid": (225, 225, 225), "text": (20, 20, 20), "reader": (225, 135, 0)}


def _reader_shifts(q: QueryReport) -> bool:
    """Whether the reader's error moves this query's bounds visibly (not where oracles read it exactly)."""
    return q.reader_lower is not None and q.lower is not None and (
        abs(q.reader_lower - q.lower) > 0.002 or abs(q.reader_upper - q.upper) > 0.002)


def write_chart(report: EvalReport, path: str | Path, width: int = 760) -> Path:
    """A PNG with one panel per query: the bounds as a shaded bar, the true value as a black tick, and
    each model's estimate (dot) with its 95 % interval (line), green when inside, red when outside.
    Where the reader errs, the bounds as the reader shows them are an orange frame, and an estimate
    outside the bounds but inside that frame is orange."""
    from PIL import Image, ImageDraw


    qrs = [q for q in report.queries if q.results]
    font, small = _font(13), _font(11)
    left, right, row_h, head_h, foot_h, gap = 170, 30, 22, 40, 26, 14
    panel_h = [head_h + row_h * max(1, len(q.results)) + foot_h for q in qrs]
    legend_h = 30
    height = legend_h + sum(panel_h) + gap * (len(qrs) + 1) + (40 if not qrs else 0)
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    x0, x1 = left, width - right

    def X(p: float) -> int:
        return round(x0 + (x1 - x0) * min(max(p, 0.0), 1.0))

    # legend
    lx = 10
    d.rectangle([lx, 10, lx + 24, 22], fill=COLORS["bounds"])
    d.text((lx + 30, 9), "optimal bounds", fill=COLORS["text"], font=small)
    lx += 140
    d.line([lx + 12, 6, lx + 12, 26], fill=COLORS["truth"], width=3)
    d.text((lx + 20, 9), "true value", fill=COLORS["text"], font=small)
    lx += 110
    for key, lab in (("inside", "estimate, 95% CI inside"), ("outside", "outside the bounds")):
        d.line([lx, 16, lx + 24, 16], fill=COLORS[key], width=2)
        d.ellipse([lx + 8, 12, lx + 16, 20], fill=COLORS[key])
        d.text((lx + 30, 9), lab, fill=COLORS["text"], font=small)
        lx += 50 + _text_width(d, lab, small)
    if any(_reader_shifts(q) for q in qrs):
        d.rectangle([lx, 10, lx + 24, 22], outline=COLORS["reader"], width=2)
        d.text((lx + 30, 9), "as the reader shows them", fill=COLORS["text"], font=small)
    if not qrs:
        d.text((10, legend_h + 10), "no query could be evaluated", fill=COLORS["text"], font=font)
    y = legend_h + gap
    for q, h in zip(qrs, panel_h):
        d.rectangle([4, y - 6, width - 4, y + h - 4], outline=COLORS["grid"])
        title = f"{q.name}: {q.query}   (units {q.n_used}/{q.n_matching}, K={report.samples})"
        d.text((10, y), _fit_text(d, title, font, width - 20), fill=COLORS["text"], font=font)
        top, bottom = y + head_h - 14, y + head_h + row_h * len(q.results)
        for t in (0, 0.25, 0.5, 0.75, 1.0):
            d.line([X(t), top, X(t), bottom], fill=COLORS["grid"])
            lab = f"{t:g}"
            d.text((X(t) - _text_width(d, lab, small) // 2, bottom + 4), lab, fill=COLORS["text"], font=small)
        if q.lower is not None:
            d.rectangle([X(q.lower) - (1 if q.upper - q.lower < 0.004 else 0), top,
                         X(q.upper) + (1 if q.upper - q.lower < 0.004 else 0), bottom], fill=COLORS["bounds"])
        if _reader_shifts(q):
            d.rectangle([X(q.reader_lower) - 1, top + 1, X(q.reader_upper) + 1, bottom - 1],
                        outline=COLORS["reader"], width=2)
        if q.truth is not None:
            d.line([X(q.truth), top - 4, X(q.truth), bottom + 2], fill=COLORS["truth"], width=3)
        for i, r in enumerate(q.results):
            cy = y + head_h + row_h * i + row_h // 2
            d.text((10, cy - 7), _fit_text(d, r.model, small, left - 20), fill=COLORS["text"], font=small)
            if r.value is None or math.isnan(r.value):
                continue
            key = "none" if r.verdict is None else ("inside" if r.verdict.inside else "reader" if (
                r.verdict_reader is not None and r.verdict_reader.inside) else "outside")
            col = COLORS[key]
            d.line([X(r.lower), cy, X(r.upper), cy], fill=col, width=2)
            d.line([X(r.lower), cy - 4, X(r.lower), cy + 4], fill=col, width=2)
            d.line([X(r.upper), cy - 4, X(r.upper), cy + 4], fill=col, width=2)
            d.ellipse([X(r.value) - 4, cy - 4, X(r.value) + 4, cy + 4], fill=col)
        y += h + gap
    return _save_png(img, path)


def write_grid(report: EvalReport, path: str | Path, scale: int = 2, blocks_per_row: int = 3) -> Path:
    """A PNG with one block per query: a row per example unit showing the factual image, each model's
    counterfactual (first sample) and, where it exists, the ground-truth counterfactual; blocks are
    laid out ``blocks_per_row`` across."""
    from PIL import Image, ImageDraw


    qrs = [q for q in report.queries if q.examples.get("factual") is not None and len(q.examples["factual"])]
    font, small = _font(13), _font(11)
    blocks = []
    for q in qrs:
        fact = q.examples["factual"]
        cols = ["factual", *report.models] + (["truth"] if "truth" in q.examples else [])
        cell = fact.shape[-1] * scale
        pad, label_h, head_h = 4, 16, 22
        width = max(pad + len(cols) * (cell + pad), 200)
        height = head_h + label_h + len(fact) * (cell + pad) + pad
        img = Image.new("RGB", (width, height), "white")
        d = ImageDraw.Draw(img)
        do = ", ".join(f"{k}={v}" for k, v in q.do.items())
        d.text((pad, 4), _fit_text(d, f"{q.name}: do({do})", font, width - 2 * pad), fill=COLORS["text"], font=font)
        for ci, name in enumerate(cols):
            d.text((pad + ci * (cell + pad), head_h), _fit_text(d, name, small, cell), fill=COLORS["text"], font=small)
        for r in range(len(fact)):
            for ci, name in enumerate(cols):
                if name == "factual":
                    a = fact[r]
                elif name == "truth":
                    a = q.examples["truth"][r]
                else:
                    a = q.examples["models"].get(name, [None] * len(fact))[r]
                if a is None:
                    continue
                a = np.asarray(a)
                arr = a[0] if a.shape[0] == 1 else np.transpose(a, (1, 2, 0))
                tile = Image.fromarray(np.ascontiguousarray(arr)).resize((cell, cell), Image.Resampling.NEAREST)
                img.paste(tile, (pad + ci * (cell + pad), head_h + label_h + r * (cell + pad)))
        blocks.append(img)
    if not blocks:
        sheet = Image.new("RGB", (240, 40), "white")
        ImageDraw.Draw(sheet).text((10, 10), "no examples", fill=COLORS["text"], font=font)
    else:
        per_row = max(1, int(blocks_per_row))
        rows = [blocks[i:i + per_row] for i in range(0, len(blocks), per_row)]
        gap = 12
        width = max(sum(b.width for b in row) + gap * (len(row) + 1) for row in rows)
        height = sum(max(b.height for b in row) for row in rows) + gap * (len(rows) + 1)
        sheet = Image.new("RGB", (width, height), (235, 235, 235))
        y = gap
        for row in rows:
            x = gap
            for b in row:
                sheet.paste(b, (x, y))
                x += b.width + gap
            y += max(b.height for b in row) + gap
    return _save_png(sheet, path)


def edit_grid(model, images: np.ndarray, factual: np.ndarray, edits: Sequence[tuple[str, str | None]],
              seed: int = 0) -> tuple[list[str], np.ndarray]:
    """(column titles, uint8 [n, 1 + len(edits), C, S, S]): each image, then its edit under each
    ``(factor, value)`` of ``edits`` (value None: the next value of the factor, the other one when binary)
    through the model's causal model (one sample; descendants follow)."""
    g = model.graph
    factual = np.asarray(factual, dtype=np.int64)
    cols, titles = [np.asarray(images)], ["input"]
    for name, value in edits:
        j = g.axis(name)
        out = np.zeros_like(np.asarray(images))
        targets = (factual[:, j] + 1) % g[name].size if value is None else np.full(len(factual), g[name].index(value))
        for t in np.unique(targets):
            idx = np.flatnonzero(targets == t)
            out[idx] = model.edit(images[idx], {name: int(t)}, factual=factual[idx], seed=seed).images[:, 0]
        cols.append(out)
        titles.append(f"{name}={value}" if value is not None else f"{name} flipped")
    return titles, np.stack(cols, 1)


def write_edit_grid(model, images: np.ndarray, factual: np.ndarray, edits: Sequence[tuple[str, str | None]],
                    path: str | Path, scale: int = 3, seed: int = 0) -> Path:
    """:func:`edit_grid` as a PNG, a row per image, magnified ``scale`` times (nearest neighbour)."""
    from PIL import Image, ImageDraw


    titles, grid = edit_grid(model, images, factual, edits, seed)
    n, k, c, size = grid.shape[0], grid.shape[1], grid.shape[2], grid.shape[-1]
    cell, pad, head = size * scale, 2, 18
    sheet = Image.new("RGB", (k * (cell + pad) + pad, head + n * (cell + pad) + pad), "white")
    d = ImageDraw.Draw(sheet)
    font = _font(11)
    for ci, title in enumerate(titles):
        d.text((pad + ci * (cell + pad), 3), _fit_text(d, title, font, cell), fill=COLORS["text"], font=font)
    for r in range(n):
        for ci in range(k):
            a = grid[r, ci]
            arr = a[0] if c == 1 else np.transpose(a, (1, 2, 0))
            tile = Image.fromarray(np.ascontiguousarray(arr)).resize((cell, cell), Image.Resampling.NEAREST)
            sheet.paste(tile, (pad + ci * (cell + pad), head + r * (cell + pad)))
    return _save_png(sheet, path)
