"""The editor: the ANCM (feature model + image mechanism + labeller), its training, file-level editing."""

from cfedit.editor.fit import ANCM, EditResult, FitOptions, fit_ancm

__all__ = ["ANCM", "EditResult", "FitOptions", "fit_ancm"]
