"""Feature-level causal models: the interface, the families and their registry.

- :mod:`~cfedit.features.base`: the :class:`FeatureModel` protocol every family implements;
- :mod:`~cfedit.features.streams`: per-unit random streams (independent, reproducible draws);
- :mod:`~cfedit.features.registry`: ``make_feature_model(family, graph)``, ``load_feature_model``;
- :mod:`~cfedit.features.canonical` (exact, response functions), :mod:`~cfedit.features.ncm` (the
  neural causal model and its min/max bounds), :mod:`~cfedit.features.baselines` (none,
  conditional, markovian).
"""

from cfedit.features.base import FeatureModel
from cfedit.features.registry import FAMILIES, load_feature_model, make_feature_model
from cfedit.features.streams import categorical, check_unit_keys, unit_uniforms

__all__ = ["FAMILIES", "FeatureModel", "categorical", "check_unit_keys", "load_feature_model",
           "make_feature_model", "unit_uniforms"]
