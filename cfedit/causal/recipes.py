"""The typed schemas of a graph file's sections ``data:``, ``fit:`` and ``reader:``, and their one check.

Torch-free: the trainers that take these options (:mod:`cfedit.image.train`,
:mod:`cfedit.image.masked_training`, :mod:`cfedit.eval.reader`) import torch, so their options are
described here once (a test keeps the schemas and the trainers' defaults in step). A graph file's
sections are checked when it is loaded (:mod:`cfedit.causal.graph_file`, which adds the file and
line); :func:`recipe_problem` is the same check for recipes that did not come from a file (a graph
built in code, a caller's overrides).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

# Kinds of option values: a count (whole number >= 1), a whole number (>= 0), a number (>= 0), a
# fraction (0..1), a flag (true/false), a list of the graph's variable names, or a tuple of the words
# allowed.
COUNT, WHOLE, NUMBER, FRACTION, FLAG, NAMES = "count", "whole", "number", "fraction", "flag", "names"

# They mirror the trainers' defaults (cfedit.image.train, cfedit.image.masked_training,
# cfedit.eval), which import torch; a test keeps the two in step.
MECHANISM_OPTIONS: dict[str, dict[str, Any]] = {
    "cvae": {"epochs": COUNT, "batch_size": COUNT, "lr": NUMBER, "width": COUNT, "latent": COUNT, "hidden": COUNT,
             "beta": NUMBER, "attr_weight": NUMBER, "swap_p": FRACTION, "attr_shift": WHOLE, "attr_flip": FLAG,
             "adv_weight": NUMBER},
    "masked": {"epochs": COUNT, "batch_size": COUNT, "lr": NUMBER, "beta1": FRACTION,
               "width": COUNT, "blocks": COUNT, "head_width": COUNT, "swap_p": FRACTION, "cls_g": NUMBER,
               "cls_d": NUMBER, "cycle": NUMBER, "mask": NUMBER, "smooth": NUMBER, "d_width": COUNT,
               "d_shift": WHOLE, "colour_pool": COUNT, "delta_bound": NUMBER, "colour": ("rgb", "tone", "luma"),
               "d_warmup": WHOLE, "region": NUMBER, "cls_balance": FLAG, "cls_strata": FLAG, "d_project": FLAG, "d_local": FLAG, "sparsity": ("mask", "change"), "keep": NUMBER, "gate": FRACTION,
               "ema_half_life": WHOLE, "lr_decay_epochs": WHOLE, "diffuse_exclude": NAMES, "save_every": COUNT},
}
#: ``fit:`` options besides those of the chosen mechanism (``mechanism:``, default cvae).
FIT_OPTIONS: dict[str, Any] = {"epochs": COUNT, "labeller_epochs": COUNT, "residual": FLAG,
                               "mechanism": tuple(MECHANISM_OPTIONS)}
#: The image mechanisms ``fit`` can train, by the name a recipe or ``--mechanism`` gives.
MECHANISMS = tuple(MECHANISM_OPTIONS)
#: ``reader:`` options: the independent reader's own and its classifier's training options.
READER_OPTIONS: dict[str, Any] = {"n": COUNT, "epochs": COUNT, "seed": WHOLE, "width": COUNT, "hidden": COUNT,
                                  "n_test": COUNT, "mirror": FLAG, "batch_size": COUNT, "lr": NUMBER,
                                  "lr_decay": FLAG, "shift": WHOLE, "flip": FLAG}


def option_problem(kind: Any, value: Any, variables: Sequence[str] | None = None) -> str | None:
    """Why ``value`` is not an option value of ``kind``, or None when it is. ``variables``: the graph's
    variable names, which a list of names must come from (unchecked when None)."""
    if kind == NAMES:
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            return "must be a list of variable names, such as [smiling]"
        if len(set(value)) != len(value):
            return "names a variable twice"
        unknown = [v for v in value if variables is not None and v not in variables]
        return f"names {unknown[0]!r}, which is no variable (variables: {', '.join(variables)})" if unknown else None
    if isinstance(kind, tuple):
        return None if isinstance(value, str) and value in kind else f"must be one of {', '.join(kind)}"
    if kind == FLAG:
        return None if isinstance(value, bool) else "must be true or false"
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if kind in (COUNT, WHOLE):
        least = 1 if kind == COUNT else 0
        return None if is_int and value >= least else f"must be a whole number of at least {least}"
    ok = (is_int or isinstance(value, float)) and math.isfinite(value) and value >= 0
    if kind == FRACTION:
        return None if ok and value <= 1 else "must be a number from 0 to 1"
    return None if ok else "must be a number of at least 0"


#: ``data:`` names one source: a Colored-MNIST setting (generated, with its SCM), an image folder, or a
#: label file (with its images); paths are relative to the graph file, with $VARIABLES expanded.
BARMNIST_SETTINGS = ("backdoor", "frontdoor")
DATA_KEYS = ("barmnist", "folder", "labels", "images")


def recipe_problem(section: str, recipe: Mapping[str, Any],
                   variables: Sequence[str] | None = None) -> tuple[str, str | None] | None:
    """The first problem of a ``fit:`` or ``reader:`` recipe as (message, offending key), or None.
    ``variables``: the graph's variable names, which options naming variables must come from.

    Messages read ``'fit' (mechanism cvae): unknown key 'latnet' (known: ...)`` or ``'reader' epochs
    must be a whole number of at least 1, not 0``; the key is None when the problem is the section's."""
    if section == "fit":
        mechanism = recipe.get("mechanism", "cvae")
        problem = option_problem(FIT_OPTIONS["mechanism"], mechanism)
        if problem:
            return f"'fit' mechanism {problem}", "mechanism"
        options = {**MECHANISM_OPTIONS[mechanism], **FIT_OPTIONS}
        what = f"'fit' (mechanism {mechanism})"
    elif section == "reader":
        options, what = READER_OPTIONS, "'reader'"
    else:
        raise ValueError(f"no recipe section {section!r} (fit, reader)")
    unknown = [k for k in recipe if k not in options]
    if unknown:
        return f"{what}: unknown key {unknown[0]!r} (known: {', '.join(options)})", unknown[0]
    for name, value in recipe.items():
        problem = option_problem(options[name], value, variables)
        if problem:
            return f"'{section}' {name} {problem}, not {value!r}", name
    return None


def data_problem(data: Mapping[str, str]) -> tuple[str, str | None] | None:
    """The first problem of a ``data:`` section (its values as written) as (message, key), or None."""
    unknown = [k for k in data if k not in DATA_KEYS]
    if unknown:
        return f"'data': unknown key {unknown[0]!r} (known: {', '.join(DATA_KEYS)})", unknown[0]
    if "images" in data and "labels" not in data:
        return "'data': images go with labels (the label file naming each image)", "images"
    if sum(k in data for k in ("barmnist", "folder", "labels")) != 1:
        return "'data' must name exactly one source: barmnist, folder, or labels (with images)", None
    if "barmnist" in data and data["barmnist"] not in BARMNIST_SETTINGS:
        return (f"'data' barmnist must name a setting ({', '.join(BARMNIST_SETTINGS)}), not {data['barmnist']!r}",
                "barmnist")
    for key in ("folder", "labels", "images"):
        if key in data and not str(data[key]).strip():
            return f"'data' {key} must be a path, not an empty word", key
    return None
