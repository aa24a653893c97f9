"""The typed schemas of a graph file's recipe sections, ``fit:`` and ``reader:``, and their checks.

Torch-free: the trainers that take these options (:mod:`cfedit.image.train`,
:mod:`cfedit.image.masked_training`, the eval reader) import torch, so their options are described
here once and checked when a graph file is loaded (a test keeps the two in step).
"""

from __future__ import annotations

import math
from typing import Any

# Kinds of option values: a count (whole number >= 1), a whole number (>= 0), a number (>= 0), a
# fraction (0..1), a flag (true/false), or a tuple of the words allowed.
COUNT, WHOLE, NUMBER, FRACTION, FLAG = "count", "whole", "number", "fraction", "flag"

# They mirror the trainers' defaults (cfedit.image.train, cfedit.image.masked_training,
# cfedit.eval), which import torch; a test keeps the two in step.
MECHANISM_OPTIONS: dict[str, dict[str, Any]] = {
    "cvae": {"epochs": COUNT, "batch_size": COUNT, "lr": NUMBER, "lr_decay": FLAG, "width": COUNT,
             "latent": COUNT, "hidden": COUNT, "beta": NUMBER, "attr_weight": NUMBER, "swap_p": FRACTION,
             "attr_residual": FLAG, "attr_shift": WHOLE, "attr_flip": FLAG, "adv_weight": NUMBER, "skip": WHOLE},
    "masked": {"epochs": COUNT, "batch_size": COUNT, "lr": NUMBER, "beta1": FRACTION, "lr_decay": FLAG,
               "width": COUNT, "blocks": COUNT, "head_width": COUNT, "swap_p": FRACTION, "cls_g": NUMBER,
               "cls_d": NUMBER, "cycle": NUMBER, "mask": NUMBER, "smooth": NUMBER, "d_width": COUNT,
               "d_shift": WHOLE, "colour_pool": COUNT, "delta_bound": NUMBER, "save_every": COUNT},
}
#: ``fit:`` options besides those of the chosen mechanism (``mechanism:``, default cvae).
FIT_OPTIONS: dict[str, Any] = {"epochs": COUNT, "labeller_epochs": COUNT, "residual": FLAG,
                               "mechanism": tuple(MECHANISM_OPTIONS)}
#: ``reader:`` options: the independent reader's own and its classifier's training options.
READER_OPTIONS: dict[str, Any] = {"n": COUNT, "epochs": COUNT, "seed": WHOLE, "width": COUNT, "hidden": COUNT,
                                  "n_test": COUNT, "mirror": FLAG, "batch_size": COUNT, "lr": NUMBER,
                                  "lr_decay": FLAG, "shift": WHOLE, "flip": FLAG}


def option_problem(kind: Any, value: Any) -> str | None:
    """Why ``value`` is not an option value of ``kind``, or None when it is."""
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
