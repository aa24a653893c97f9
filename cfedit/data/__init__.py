"""Data sources: the MNIST files, the Colored-MNIST-with-bars generator, labelled image folders.

Everything here raises :class:`DataError` for problems a user can fix (a missing file, a bad
label); its message is one line, ready for ``cfedit: error: ...``.
"""

from __future__ import annotations


from cfedit.errors import DataError  # re-exported: ``from cfedit.data import DataError``

# Submodules import DataError from here, so it is imported before they are.
from cfedit.data.mnist import default_cache_dir, load_mnist, mnist_root  # noqa: E402
from cfedit.data.barmnist import (  # noqa: E402
    BarMNIST,
    WriteSummary,
    oracle_bar,
    oracle_color,
    oracle_factors,
    render_barmnist,
    write_barmnist,
)
from cfedit.data.folder import (  # noqa: E402
    ImageFolderDataset,
    dataset_for_graph,
    heldout_split,
    load_labels,
    read_label_table,
)

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
]
