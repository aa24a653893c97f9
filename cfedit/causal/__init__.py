"""The causal core, torch-free: graphs, queries, SCMs, P(V), the canonical parametrisation, bounds."""
