"""The ANCM (augmented neural causal model): feature model + image mechanism + labeller, composed.

    image ──labeller──▶ v (factual factors)          image ──mechanism.abduct(i, v)──▶ u_I
    v ──feature model: abduct U_V | v, do(X=x′), predict──▶ v′ (counterfactual factors)
    mechanism.decode(v′, u_I) ──▶ counterfactual image          (as the EditPolicy says)

It has no maths of its own: each step belongs to one of its parts. :func:`cfedit.editor.fit.fit_ancm`
trains the parts and writes one checkpoint; :meth:`ANCM.load` reads it back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from cfedit.causal.graph import CausalGraph
from cfedit.causal.pv import cells
from cfedit.causal.query import Query, Term
from cfedit.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from cfedit.editor.policy import EditPolicy
from cfedit.features import FeatureModel, load_feature_model


@dataclass
class EditResult:
    """Factual factors [n, k], counterfactual factors [n, K, k], counterfactual images uint8 [n, K, C, S, S]."""

    factual: np.ndarray
    counterfactual: np.ndarray
    images: np.ndarray
    do: dict[str, int]


@dataclass
class ANCM:
    graph: CausalGraph
    features: FeatureModel
    mechanism: Any  # cfedit.image.ImageMechanism
    labeller: Any  # cfedit.image.Labeller
    pv: np.ndarray  # the observational P(V) the model was fitted to (its extreme models use it)
    info: dict = field(default_factory=dict)
    policy: EditPolicy = field(default_factory=EditPolicy)  # how the decoded change reaches the image
    _cache: dict = field(default_factory=dict, repr=False)  # extreme models and bounds, per query

    @property
    def residual(self) -> bool:
        """Whether edits apply the decoded change to the input (:attr:`EditPolicy.residual`)."""
        return self.policy.residual

    @residual.setter
    def residual(self, value: bool) -> None:
        self.policy = EditPolicy(residual=bool(value))

    # -- persistence --------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        fconf, farrays = self.features.state()
        tensors: dict[str, Any] = {"pv": self.pv}
        tensors.update({f"features.{k}": v for k, v in farrays.items()})
        tensors.update({f"mechanism.{k}": v for k, v in self.mechanism.state_dict().items()})
        tensors.update({f"labeller.{k}": v for k, v in self.labeller.state_dict().items()})
        config = {"features": fconf, "mechanism": self.mechanism.config(), "labeller": self.labeller.config(),
                  "edit": self.policy.to_config()}
        return save_checkpoint(path, tensors, self.graph, config, extra=self.info)

    @classmethod
    def load(cls, path: str | Path, graph: CausalGraph | None = None, device: str = "cpu") -> "ANCM":
        ck = load_checkpoint(path)
        if graph is not None:
            ck.check_graph(graph)
        return cls.from_checkpoint(ck, device)

    @classmethod
    def from_checkpoint(cls, ck: Checkpoint, device: str = "cpu") -> "ANCM":
        from cfedit.image import Labeller, mechanism_from_config

        g = ck.graph
        feats = load_feature_model(g, ck.config["features"],
                                   {k: v.numpy() for k, v in ck.section("features").items()})
        mech = ck.module("mechanism", mechanism_from_config)
        lab = ck.module("labeller", Labeller.from_config)
        policy = EditPolicy.from_checkpoint(ck)
        return cls(g, feats, mech.to(device).eval(), lab.to(device).eval(), ck.tensors["pv"].numpy(), ck.extra,
                   policy)

    # -- editing ------------------------------------------------------------------------------

    def read_factors(self, images: np.ndarray, given: Mapping[str, str | int] | None = None) -> np.ndarray:
        """Factual factors of images: the labeller's reading, overridden by ``given`` values."""
        v = np.asarray(self.labeller.predict(images), dtype=np.int64)
        for k, val in self.graph.value_indices(given).items():
            v[:, self.graph.axis(k)] = val
        return v

    def feature_model_for(self, factual_row: np.ndarray, do: Mapping[str, int], bound: str | None) -> FeatureModel:
        """The default feature model, or the canonical model at a bound of the edit's query."""
        if bound is None:
            return self.features
        query = self.edit_query(factual_row, do)
        if query is None:  # the intervention has no descendant: every model agrees
            return self.features
        key = (str(query), bound)
        if key not in self._cache:
            from cfedit.features.canonical import CanonicalModel

            self._cache[key] = CanonicalModel.extreme(self.graph, self.pv, query, side=bound)
        return self._cache[key]

    def unit_query(self, factual_row: np.ndarray, do: Mapping[str, int], target: str, value: str) -> Query:
        """P(target_{do}=value | every factual factor of the unit)."""
        g = self.graph
        interventions = tuple((k, g[k].values[v]) for k, v in do.items())
        evidence = tuple(Term(n, g[n].values[int(factual_row[i])]) for i, n in enumerate(g.names))
        return Query((Term(target, value, interventions),), evidence)

    def edit_query(self, factual_row: np.ndarray, do: Mapping[str, int]) -> Query | None:
        """P(Y_{do}=y | all factual factors) for the first descendant Y of the intervention, at its
        last value (``yes`` for a binary factor) — the query ``--bound`` pushes to its bound."""
        desc = [d for d in self.graph.descendants(list(do)) if d not in do]
        if not desc:
            return None
        return self.unit_query(factual_row, do, desc[0], self.graph[desc[0]].values[-1])

    def counterfactual_factors(self, factual: np.ndarray, do: Mapping[str, str | int], n_samples: int = 1,
                               seed: int = 0, bound: str | None = None,
                               unit_keys: Sequence[int] | None = None) -> np.ndarray:
        """Counterfactual factors [n, n_samples, k] of factual factors [n, k] under do(); with
        ``unit_keys`` row i draws from its own stream keyed by (seed, unit_keys[i]) (see
        :func:`cfedit.features.unit_uniforms`), also at a ``bound``."""
        do_idx = self.graph.value_indices(do)
        factual = np.asarray(factual, dtype=np.int64)
        if bound is None:
            return self.features.counterfactual(factual, do_idx, n_samples=n_samples, seed=seed, unit_keys=unit_keys)
        out = np.empty((len(factual), n_samples, factual.shape[1]), dtype=np.int64)
        for r, row, idx in cells(factual):
            model = self.feature_model_for(row, do_idx, bound)
            if unit_keys is None:
                out[idx] = model.counterfactual(factual[idx], do_idx, n_samples=n_samples, seed=seed + r)
            else:
                out[idx] = model.counterfactual(factual[idx], do_idx, n_samples=n_samples, seed=seed,
                                                unit_keys=[unit_keys[i] for i in idx])
        return out

    def edit(self, images: np.ndarray, do: Mapping[str, str | int], given: Mapping[str, str | int] | None = None,
             factual: np.ndarray | None = None, n_samples: int = 1, seed: int = 0,
             bound: str | None = None, residual: bool | None = None,
             unit_keys: Sequence[int] | None = None) -> EditResult:
        """Counterfactual images of uint8 images [n, C, S, S] under do(); K = n_samples per image.

        ``residual`` (default: the model's setting) applies the decoded change to the input instead of
        returning the decoded counterfactual. ``unit_keys`` (one non-negative int per image) gives each
        image its own random stream, so its draws depend on the seed and its key only, not on the
        other images of the call (the image side draws nothing: abduction and decoding are
        deterministic given the factors).
        """
        images = np.asarray(images)
        v = self.read_factors(images, given) if factual is None else np.asarray(factual, dtype=np.int64)
        cf = self.counterfactual_factors(v, do, n_samples=n_samples, seed=seed, bound=bound, unit_keys=unit_keys)
        n, k = len(images), n_samples
        imgs = self.transform(images, v, cf.reshape(n * k, -1), residual=residual).reshape(n, k, *images.shape[1:])
        return EditResult(v, cf, imgs, self.graph.value_indices(do))

    def apply(self, images: Any, do: Mapping[str, str | int], given: Mapping[str, str | int] | None = None,
              samples: int = 1, seed: int = 0, bound: str | None = None, residual: bool | None = None) -> Any:
        """Edit images as the caller holds them and return the same type: PIL images (any size; the
        result has the input's size), float tensors or arrays in [0, 1] NCHW, or uint8 arrays at the
        model's size (:mod:`cfedit.editor.convert`). Image i draws from its own stream keyed by
        (``seed``, i); with ``samples`` > 1 the samples follow the image axis."""
        from cfedit.editor.convert import to_model

        x, restore = to_model(images, self.graph, samples)
        r = self.edit(x, do, given=given, n_samples=samples, seed=seed, bound=bound, residual=residual,
                      unit_keys=range(len(x)))
        return restore(r.images)

    def transform(self, images: np.ndarray, factual: np.ndarray, counterfactual: np.ndarray,
                  residual: bool | None = None) -> np.ndarray:
        """The image side of an edit: uint8 images [n, C, S, S] with factual factors [n, k] redrawn
        with counterfactual factors [n * K, k] (K per image, consecutive); uint8 [n * K, C, S, S].

        Abduction u = abduct(image, factual); the result is decode(counterfactual, u), or with
        ``residual`` (default: the model's setting) image + decode(counterfactual, u) - decode(factual, u),
        whose null edit (counterfactual = factual) is the image itself.
        """
        return self.policy.redraw(self.mechanism, images, factual, counterfactual, residual)

    def bounds_pv(self) -> np.ndarray:
        """The P(V) the bounds of an edit are computed from: :func:`cfedit.data.observational_pv` with this
        model's P(V) standing in for its data (so ``edit`` and ``bounds`` agree, and nothing is read)."""
        if "pv" not in self._cache:
            from cfedit.data.sources import observational_pv

            self._cache["pv"] = observational_pv(self.graph, fitted=self.pv).pv
        return self._cache["pv"]

    def descendant_bounds(self, factual_row: np.ndarray, do: Mapping[str, int], cf_row: np.ndarray) -> dict:
        """For each descendant Y of the intervention: the optimal bounds of P(Y_{do} = y′ | factual),
        y′ being the value this edit gave it — what the data cannot decide, stated honestly."""
        from cfedit.causal.bounds import BoundsError, compute_bounds

        g = self.graph
        out = {}
        cell = tuple(int(x) for x in factual_row), tuple(sorted((k, int(v)) for k, v in do.items()))
        for y in g.descendants(list(do)):
            if y in do:
                continue
            value = g[y].values[int(cf_row[g.axis(y)])]
            # keyed by the factual cell first: a folder of edits asks the same few questions many times
            key = ("bounds", cell, y, value)
            if key not in self._cache:
                q = self.unit_query(factual_row, do, y, value)
                try:
                    b = compute_bounds(g, self.bounds_pv(), q)
                    self._cache[key] = {"value": value, "lower": round(b.lower, 6), "upper": round(b.upper, 6),
                                        "query": str(q)}
                except BoundsError as e:  # e.g. factual factors of probability zero in the data
                    self._cache[key] = {"value": value, "lower": None, "upper": None, "query": str(q),
                                        "note": str(e)}
            out[y] = self._cache[key]
        return out
