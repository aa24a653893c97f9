"""Time the sharp bounds of every named query of every shipped graph (exact P(V) from the built-in SCM).

    python benchmarks/bench_bounds.py [--repeat 3]

Prints one row per query: graph, query, lower, upper, true value, method, certified, milliseconds
(best of --repeat runs), and the total per graph. Figures only, no asserts.
"""

from __future__ import annotations

import argparse
import time

from cfedit.causal.bounds import BoundsError, compute_bounds
from cfedit.causal.graph_file import load_graph, shipped_graphs
from cfedit.causal.query import parse_query
from cfedit.causal.scm import scm_for_graph


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3, help="runs per query; the best time is shown")
    args = ap.parse_args()

    header = f"{'graph':<10} {'query':<66} {'lower':>7} {'upper':>7} {'true':>7} {'method':<13} {'cert':<5} {'ms':>8}"
    print(header)
    print("-" * len(header))
    for path in shipped_graphs():
        g = load_graph(path)
        scm = scm_for_graph(g)
        if scm is None or not g.queries:
            print(f"{g.name:<10} (no built-in SCM or no named queries: skipped)")
            continue
        pv = scm.joint()
        total = 0.0
        t_graph = time.perf_counter()
        for name, text in g.queries.items():
            best, b = float("inf"), None
            try:
                for _ in range(max(1, args.repeat)):
                    t0 = time.perf_counter()
                    b = compute_bounds(g, pv, text)
                    best = min(best, time.perf_counter() - t0)
            except BoundsError as e:
                print(f"{g.name:<10} {text:<66} error: {e}")
                continue
            total += best
            true = scm.prob(parse_query(text))
            print(f"{g.name:<10} {text:<66} {b.lower:>7.4f} {b.upper:>7.4f} {true:>7.4f} {b.method:<13} "
                  f"{'yes' if b.certified else 'no':<5} {1000 * best:>8.1f}")
        print(f"{g.name:<10} {'total (best runs)':<66} {'':>7} {'':>7} {'':>7} {'':<13} {'':<5} {1000 * total:>8.1f}"
              f"   (wall incl. repeats and truth: {time.perf_counter() - t_graph:.2f} s)")


if __name__ == "__main__":
    main()
