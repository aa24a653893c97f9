"""Print the README's results tables (markdown) from `cfedit eval --out DIR` reports.

    python docs/results_table.py /tmp/eval_bd/report.json /tmp/eval_fd/report.json
"""

import json
import sys


def fmt(x, digits=3):
    return "—" if x is None else f"{x:.{digits}f}"


def verdict_cell(res):
    v, vr = res["verdict"], res.get("verdict_reader")
    if not v:
        return f"{res['value']:.3f} ?"
    if v["inside"]:
        return f"{res['value']:.3f} ✓"
    if vr and vr["inside"]:  # outside the bounds themselves, inside them as the reader shows them
        return f"{res['value']:.3f} ✓ᴿ (out by {v['gap']:.3f})"
    return f"{res['value']:.3f} ✗ out by {v['gap']:.3f}"


def main() -> None:
    for path in sys.argv[1:]:
        r = json.load(open(path))
        models = r["models"]
        print(f"\n**{r['graph']}** ({r['samples']} edits per unit; bounds from {r['bounds_source']})\n")
        reader_cols = any(q.get("reader_lower") is not None and q.get("reader_tpr", 1) < 0.995
                          for q in r["queries"])
        head = "| query | bounds | " + ("as the reader shows them | " if reader_cols else "true | ")
        print(head + " | ".join(models) + " |")
        print("|---|---|---|" + "---|" * len(models))
        for q in r["queries"]:
            if q.get("skipped"):
                continue
            cells = [verdict_cell(res) for res in q["results"]]
            if reader_cols:
                third = (f"[{q['reader_lower']:.4f}, {q['reader_upper']:.4f}]" if q.get("reader_lower") is not None
                         else "—")
            else:
                third = f"{q['truth']:.4f}" if q.get("truth") is not None else "—"
            text = q["query"].replace("|", "\\|")  # a bar inside a markdown table cell must be escaped
            print(f"| {q['name']} `{text}` | [{q['lower']:.4f}, {q['upper']:.4f}] | {third} | "
                  + " | ".join(cells) + " |")
        print("\n| model | features | effectiveness | preservation | agreement | null edit 1 / 10 cycles | "
              "reconstruction | reversibility | MAE to true cf image |")
        print("|---|---|---|---|---|---|---|---|---|")
        for m in r["metrics"]:
            c = m["composition"]
            print(f"| {m['model']} | {m['family']} | {fmt(m['effectiveness'])} | {fmt(m['preservation'])} | "
                  f"{fmt(m['agreement'])} | {c['1']:.4f} / {c['10']:.4f} | {fmt(m.get('reconstruction'), 4)} | "
                  f"{fmt(m['reversibility'], 4)} | {fmt(m['gt_mae'], 4)} |")
        if any(vm.get("by_value") for m in r["metrics"] for vm in m["variables"]):
            print("\n| model | do | units | read as the new value | real images read as it | ratio | "
                  "kept (non-descendants, read the same before and after; ≤ the most an edit read like real images of the new value can show) |")
            print("|---|---|---|---|---|---|---|")
            for m in r["metrics"]:
                for vm in m["variables"]:
                    ceiling = vm.get("kept_ceiling", {})
                    kept = ", ".join(f"{k} {x:.3f}" + (f" (≤ {ceiling[k]:.3f})" if k in ceiling else "")
                                     for k, x in vm.get("kept", {}).items())
                    for i, (val, ve) in enumerate(vm.get("by_value", {}).items()):
                        print(f"| {m['model']} | {vm['variable']}={val} | {ve['n_units']} | "
                              f"{fmt(ve['effectiveness'])} | {fmt(ve['real_rate'])} | {fmt(ve['ratio'])} | "
                              f"{kept if i == 0 else ''} |")


if __name__ == "__main__":
    main()
