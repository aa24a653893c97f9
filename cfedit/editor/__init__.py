"""The editor: the ANCM (feature model + image mechanism + labeller), its edit policy, its training,
file-level editing, and the shipped models."""

from cfedit.editor.fit import FitOptions, fit_ancm
from cfedit.editor.model import ANCM, EditResult
from cfedit.editor.policy import EditPolicy

__all__ = ["ANCM", "EditPolicy", "EditResult", "FitOptions", "fit_ancm"]
