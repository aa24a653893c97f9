"""The models ``cfedit eval`` compares: checkpoints, and baselines that share a checkpoint's image parts.

Baselines reuse a checkpoint's image mechanism and labeller with another feature model
(:func:`with_features`), so canonical / NCM checkpoints are compared with ``none``, ``conditional``
and ``markovian`` without retraining any image model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cfedit.causal.graph import CausalGraph


def with_features(model, family: str, seed: int = 0, fitted=None):
    """The same editor (image mechanism, labeller, P(V)) with another feature model: ``family`` from
    :data:`cfedit.features.FAMILIES` fitted to ``model.pv`` (or an already fitted ``fitted``)."""
    from cfedit.editor import ANCM
    from cfedit.features import make_feature_model

    feats = fitted if fitted is not None else make_feature_model(family, model.graph).fit(model.pv, seed=seed)
    info = {**dict(model.info or {}), "features": feats.family, "derived_from": model.info.get("features")}
    return ANCM(model.graph, feats, model.mechanism, model.labeller, model.pv, info, model.policy)


def load_models(checkpoints: Sequence[str | Path], graph: CausalGraph | None = None,
                baselines: Sequence[str] = (), device: str = "cpu") -> dict[str, Any]:
    """``{name: ANCM}`` for eval: each checkpoint (named by its file stem) and, for each family in
    ``baselines``, the first checkpoint with that feature model (named by the family)."""
    from cfedit.editor import ANCM

    models: dict[str, Any] = {}
    for p in checkpoints:
        name = base = Path(p).stem
        i = 2
        while name in models:
            name, i = f"{base}-{i}", i + 1
        models[name] = ANCM.load(p, graph=graph, device=device)
    if baselines and not models:
        raise ValueError("baselines need a checkpoint to borrow the image mechanism from")
    first = next(iter(models.values()), None)
    for fam in baselines:
        name = fam if fam not in models else f"baseline-{fam}"
        models[name] = with_features(first, fam)
    return models
