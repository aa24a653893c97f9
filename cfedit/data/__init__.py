"""Data sources: the MNIST files, Colored MNIST with bars (with its ground-truth SCMs), labelled image
folders, and where a graph's data and P(V) come from (:mod:`cfedit.data.sources`).

Everything here raises :class:`DataError` for problems a user can fix (a missing file, a bad
label); its message is one line, ready for ``cfedit: error: ...``.
"""

from __future__ import annotations

from cfedit.data.barmnist import (
    BarMNIST,
    WriteSummary,
    oracle_bar,
    oracle_color,
    oracle_factors,
    render_barmnist,
    write_barmnist,
)
from cfedit.data.folder import ImageFolderDataset, heldout_split, load_labels, read_label_table
from cfedit.data.mnist import default_cache_dir, load_mnist, mnist_root
from cfedit.data.sources import GroundTruth, ObservationalPV, dataset_for_graph, ground_truth, observational_pv
from cfedit.errors import DataError  # re-exported: ``from cfedit.data import DataError``

__all__ = [
    "DataError",
    "default_cache_dir",
    "load_mnist",
    "mnist_root",
    "BarMNIST",
    "WriteSummary",
    "oracle_bar",
    "oracle_color",
    "oracle_factors",
    "render_barmnist",
    "write_barmnist",
    "ImageFolderDataset",
    "dataset_for_graph",
    "heldout_split",
    "load_labels",
    "read_label_table",
    "GroundTruth",
    "ObservationalPV",
    "ground_truth",
    "observational_pv",
]
