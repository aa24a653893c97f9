"""cfedit: causal counterfactual image editing with optimal bounds (the ANCM method)."""

__version__ = "0.1.0"
