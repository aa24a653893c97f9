"""NCM bounds vs exact bounds on the built-in settings: intervals and the time each takes.

    python benchmarks/bench_ncm.py                       # both settings, every named query
    python benchmarks/bench_ncm.py --settings backdoor --queries recolor_green recolor_red

P(V) is empirical, from ``--samples`` draws of the ground-truth SCM; the
exact bounds are computed from that same P(V). For each setting the default NCM is fitted once
(its time, TV to P(V) and counterfactual acceptance rate are printed) and then, per query, the max
and min models are trained from it. Figures are measured in this run; nothing is asserted.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from cfedit.causal.pv import as_pv, total_variation
from cfedit.causal.graph_file import load_graph
from cfedit.features.ncm import NCM, NCMConfig, ncm_bounds
from cfedit.causal.query import parse_query
from cfedit.causal.scm import builtin_scm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", nargs="+", default=["backdoor", "frontdoor"])
    ap.add_argument("--queries", nargs="*", default=None, help="named queries (default: all)")
    ap.add_argument("--samples", type=int, default=60000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--steps", type=int, default=None, help="extreme-training steps (default: config)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from cfedit.causal.bounds import compute_bounds

    cfg = NCMConfig() if args.steps is None else NCMConfig(extreme_steps=args.steps)
    rows = []
    for name in args.settings:
        graph = load_graph(name)
        scm = builtin_scm(name)
        _, v = scm.sample(args.samples, seed=args.seed)
        pv = as_pv(graph, v)
        t0 = time.perf_counter()
        base = NCM(graph, cfg, seed=args.seed).fit(pv)
        fit_s = time.perf_counter() - t0
        _, fac = scm.sample(200, seed=args.seed + 1)
        some_child = next((x for x in graph.names if graph.children(x)), graph.names[0])
        base.counterfactual(fac, {some_child: 0}, n_samples=8, seed=args.seed)
        acc = base.last_abduction
        print(f"[{name}] default NCM: fit {fit_s:.1f} s, TV(model, P(V)) = {total_variation(base.joint(), pv):.4f}, "
              f"TV(P(V), truth) = {total_variation(pv, scm.joint()):.4f}, abduction acceptance rate "
              f"{acc['acceptance_rate']:.3f} (min {acc['min_acceptance_rate']:.3f}, "
              f"{acc['candidates']} candidates)", flush=True)
        for qname, text in graph.queries.items():
            if args.queries and qname not in args.queries:
                continue
            t0 = time.perf_counter()
            b = compute_bounds(graph, pv, text)
            exact_s = time.perf_counter() - t0
            nb = ncm_bounds(graph, pv, text, seed=args.seed, config=cfg, base=base)
            row = {"setting": name, "query": qname, "true": scm.prob(parse_query(text)), "lo": b.lower,
                   "hi": b.upper, "exact_s": exact_s, "nlo": nb.lower, "nhi": nb.upper, "value": nb.value,
                   "ncm_s": nb.seconds, "s_max": nb.seconds_max, "s_min": nb.seconds_min,
                   "tv": max(nb.tv_max, nb.tv_min)}
            rows.append(row)
            print(f"  {qname}: exact [{b.lower:.4f}, {b.upper:.4f}]  ncm [{nb.lower:.4f}, {nb.upper:.4f}]  "
                  f"({nb.seconds:.1f} s)", flush=True)

    head = (f"{'setting':<10} {'query':<20} {'true':>6} {'exact lo':>8} {'exact hi':>8} {'exact ms':>8} "
            f"{'ncm lo':>7} {'ncm hi':>7} {'|dlo|':>6} {'|dhi|':>6} {'default':>7} {'ncm s':>6} "
            f"{'max s':>6} {'min s':>6} {'TV ext':>7}")
    print()
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['setting']:<10} {r['query']:<20} {r['true']:>6.4f} {r['lo']:>8.4f} {r['hi']:>8.4f} "
              f"{1000 * r['exact_s']:>8.1f} {r['nlo']:>7.4f} {r['nhi']:>7.4f} {abs(r['nlo'] - r['lo']):>6.4f} "
              f"{abs(r['nhi'] - r['hi']):>6.4f} {r['value']:>7.4f} {r['ncm_s']:>6.1f} {r['s_max']:>6.1f} "
              f"{r['s_min']:>6.1f} {r['tv']:>7.4f}")
    if rows:
        worst = max(max(abs(r["nlo"] - r["lo"]), abs(r["nhi"] - r["hi"])) for r in rows)
        print(f"\nworst |NCM - exact| endpoint: {worst:.4f};  mean time per query: NCM "
              f"{np.mean([r['ncm_s'] for r in rows]):.1f} s vs exact {1000 * np.mean([r['exact_s'] for r in rows]):.1f} ms")


if __name__ == "__main__":
    main()
