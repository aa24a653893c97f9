"""Print the README's results tables (markdown) from `cfedit eval --out DIR` reports.

    python docs/results_table.py /tmp/eval_bd/report.json /tmp/eval_fd/report.json
"""

import json
import sys


def main() -> None:
    for path in sys.argv[1:]:
        r = json.load(open(path))
        models = r["models"]
        print(f"\n**{r['graph']}** ({r['samples']} edits per unit; bounds from {r['bounds_source']})\n")
        print("| query | bounds | true | " + " | ".join(models) + " |")
        print("|---|---|---|" + "---|" * len(models))
        for q in r["queries"]:
            if q.get("skipped"):
                continue
            cells = []
            for res in q["results"]:
                v = res["verdict"]
                mark = "✓" if v and v["inside"] else f"✗ out by {v['gap']:.3f}" if v else "?"
                cells.append(f"{res['value']:.3f} {mark}")
            truth = f"{q['truth']:.4f}" if q.get("truth") is not None else "—"
            text = q["query"].replace("|", "\\|")  # a bar inside a markdown table cell must be escaped
            print(f"| {q['name']} `{text}` | [{q['lower']:.4f}, {q['upper']:.4f}] | {truth} | "
                  + " | ".join(cells) + " |")
        print("\n| model | features | effectiveness | preservation | agreement | null edit 1 / 10 cycles | "
              "reversibility | MAE to true cf image |")
        print("|---|---|---|---|---|---|---|---|")
        for m in r["metrics"]:
            c = m["composition"]
            print(f"| {m['model']} | {m['family']} | {m['effectiveness']:.3f} | {m['preservation']:.3f} | "
                  f"{m['agreement']:.3f} | {c['1']:.4f} / {c['10']:.4f} | {m['reversibility']:.4f} | "
                  f"{m['gt_mae']:.4f} |")


if __name__ == "__main__":
    main()
