"""The feature-model families by name (``--features``), and rebuilding a model from a checkpoint."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from cfedit.causal.graph import CausalGraph
from cfedit.features.base import FeatureModel

FAMILIES = ("ncm", "canonical", "none", "conditional", "markovian")


def _builders() -> dict[str, Callable[[CausalGraph], FeatureModel]]:
    # imported on use: the NCM needs torch, the others do not
    from cfedit.features.baselines import ConditionalModel, MarkovianModel, NoCausalModel
    from cfedit.features.canonical import CanonicalModel

    def ncm(graph: CausalGraph) -> FeatureModel:
        from cfedit.features.ncm import NCM

        return NCM(graph)

    return {"ncm": ncm, "canonical": CanonicalModel, "none": NoCausalModel, "conditional": ConditionalModel,
            "markovian": lambda g: MarkovianModel(g, CanonicalModel(g.markovian_version()))}


def make_feature_model(family: str, graph: CausalGraph) -> FeatureModel:
    """An unfitted feature model of a family (``--features``)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown feature-model family {family!r} ({', '.join(FAMILIES)})")
    return _builders()[family](graph)


def load_feature_model(graph: CausalGraph, config: Mapping[str, Any], arrays: Mapping[str, Any]) -> FeatureModel:
    """Rebuild a feature model from what :meth:`FeatureModel.state` returned."""
    family = config.get("family")
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    if family == "markovian":
        from cfedit.features.baselines import MarkovianModel
        from cfedit.features.canonical import CanonicalModel

        inner = CanonicalModel.from_state(graph.markovian_version(), config["inner"], arrays)
        return MarkovianModel(graph, inner)
    model = make_feature_model(family, graph)
    return type(model).from_state(graph, config, arrays)
