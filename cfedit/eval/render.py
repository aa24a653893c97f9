"""Renderers of an :class:`~cfedit.eval.report.EvalReport` for people: rich tables, and all outputs at once.

:func:`render_tables` gives the tables ``cfedit eval`` prints; :func:`write_outputs` writes
``report.json`` with the chart and the grid of :mod:`cfedit.eval.figures`.
"""

from __future__ import annotations

import math
from pathlib import Path

from cfedit.eval.figures import write_chart, write_grid
from cfedit.eval.report import REALISM_NOTE, EvalReport, report_to_json
from cfedit.files import atomic_write_bytes


def _f(x: float | None, d: int = 3) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{d}f}"


def render_tables(report: EvalReport) -> list:
    """rich Tables: the queries (bounds, truth, each model's estimate and verdict) and the metrics."""
    from rich.table import Table

    tq = Table(title=f"ctf-consistency on {report.graph}: estimates read off the edited images "
                     f"(K={report.samples} edits per unit, 95% Wilson CI)",
               caption=f"bounds from the {report.bounds_source}; inside = the 95% CI is within "
                       f"{report.margin:g} of the bounds; reader: "
                       f"{report.reader.describe() if report.reader else '—'}")
    for col in ("query", "bounds", "true", "model", "estimate [95% CI]", "units", "verdict"):
        tq.add_column(col, justify="right" if col in ("true", "units") else "left", overflow="fold")
    for qr in report.queries:
        qcell = f"[bold]{qr.name}[/bold]\n{qr.query}"
        if (qr.reader_tpr is not None and qr.reader_tpr < 0.995) or (qr.reader_fpr or 0) > 0.005:
            # the reader alone caps what an estimate can show: flag it where it is not exact
            qcell += (f"\n[dim]reader on real test images: reads the target {_f(qr.reader_tpr)} where it "
                      f"holds, {_f(qr.reader_fpr)} where not[/dim]")
        bcell = "—" if qr.lower is None else f"[{qr.lower:.4f}, {qr.upper:.4f}]"
        if qr.skipped or not qr.results:
            tq.add_row(qcell, bcell, _f(qr.truth, 4), "", "", str(qr.n_used),
                       f"[yellow]skipped: {qr.skipped or 'no result'}[/yellow]", end_section=True)
            continue
        for i, r in enumerate(qr.results):
            if r.verdict is None:
                vcell = "[dim]no bounds[/dim]"
            elif r.verdict.inside:
                vcell = "[green]inside[/green]"
            elif r.verdict_reader is not None and r.verdict_reader.inside:
                vcell = f"[yellow]outside by {r.verdict.gap:.3f}[/yellow]\n(within the reader's error)"
            else:
                vcell = f"[red]outside by {r.verdict.gap:.3f}[/red]"
            units = f"{r.n_units}" + (f"/{qr.n_matching}" if i == 0 else "")
            tq.add_row(qcell if i == 0 else "", bcell if i == 0 else "", _f(qr.truth, 4) if i == 0 else "",
                       f"{r.model}", f"{_f(r.value)} [{_f(r.lower)}, {_f(r.upper)}]", units, vcell,
                       end_section=i == len(qr.results) - 1)
    tables = [tq]
    if report.metrics:
        tm = Table(title="edit metrics (general, on test units; pixel errors in [0, 1])",
                   caption=f"{REALISM_NOTE} Floor FID {_f(report.realism.get('fid_floor'), 2)}, "
                           f"KID {_f(report.realism.get('kid_floor'), 4)} (n={report.realism.get('n')}).")
        for col in ("model", "features", "effective", "preserve", "agree", "null edit 1/10", "recon",
                    "reverse", "GT MAE", "FID", "KID", "FID null"):
            tm.add_column(col, justify="left" if col in ("model", "features") else "right")
        for mm in report.metrics:
            tm.add_row(mm.model, mm.family, _f(mm.effectiveness), _f(mm.preservation), _f(mm.agreement),
                       f"{_f(mm.composition.get('1'), 4)}/{_f(mm.composition.get('10'), 4)}",
                       _f(mm.reconstruction, 4), _f(mm.reversibility, 4), _f(mm.gt_mae, 4), _f(mm.fid, 2),
                       _f(mm.kid, 4), _f(mm.fid_null, 2))
        tables.append(tm)
        tv = Table(title="per intervened factor")
        for col in ("model", "do", "units", "effective", "preserve", "agree", "reverse", "GT MAE",
                    "GT MAE (same factors)"):
            tv.add_column(col, justify="left" if col in ("model", "do") else "right")
        for mm in report.metrics:
            for i, vm in enumerate(mm.variables):
                tv.add_row(mm.model if i == 0 else "", vm.variable, str(vm.n_units), _f(vm.effectiveness),
                           _f(vm.preservation), _f(vm.agreement), _f(vm.reversibility, 4), _f(vm.gt_mae, 4),
                           _f(vm.gt_mae_same_factors, 4), end_section=i == len(mm.variables) - 1)
        tables.append(tv)
        te = Table(title="effectiveness per new value against real images, and what each edit kept",
                   caption="edited: read as the new value; real: real test images labelled with that value read "
                           "as it; ratio = edited / real. kept: non-descendants read the same before and after (≤: the most an "
                           "edit read like real faces of the new value can show, see kept_ceiling in the JSON); "
                           "the reader itself keeps its reading under a one-pixel shift for "
                           + ", ".join(f"{k} {v:.3f}" for k, v in report.realism.get("reader_shift_kept", {}).items()))
        for col in ("model", "do", "units", "edited", "real", "ratio", "kept (non-descendants)"):
            te.add_column(col, justify="left" if col in ("model", "do", "kept (non-descendants)") else "right",
                          overflow="fold")
        for mm in report.metrics:
            rows = [(vm, val, ve) for vm in mm.variables for val, ve in vm.by_value.items()]
            for i, (vm, val, ve) in enumerate(rows):
                first = val == next(iter(vm.by_value))
                kept = ", ".join(f"{k} {x:.3f}" + (f" (≤{vm.kept_ceiling[k]:.3f})" if k in vm.kept_ceiling else "")
                                 for k, x in vm.kept.items()) if first else ""
                te.add_row(mm.model if i == 0 else "", f"{vm.variable}={val}", str(ve.n_units), _f(ve.effectiveness),
                           _f(ve.real_rate), _f(ve.ratio), kept, end_section=i == len(rows) - 1)
        tables.append(te)
    return tables


def write_outputs(report: EvalReport, out: str | Path) -> dict[str, Path]:
    """``out/report.json``, ``out/chart.png``, ``out/grid.png``; returns their paths."""

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "report.json", (report_to_json(report) + "\n").encode())
    return {"json": out / "report.json", "chart": write_chart(report, out / "chart.png"),
            "grid": write_grid(report, out / "grid.png")}
