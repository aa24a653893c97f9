"""Shared fixtures: the real data sets in ../shared/data (or $CFEDIT_DATA), skipped when absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data folder: $CFEDIT_DATA, else ../shared/data next to the repository."""
    env = os.environ.get("CFEDIT_DATA")
    path = Path(env) if env else REPO.parent / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"shared data folder {path} is absent (set CFEDIT_DATA to a folder holding MNIST/raw/)")
    return path


@pytest.fixture(scope="session")
def mnist_root(shared_data: Path) -> Path:
    """A torchvision root holding MNIST/raw/ with both splits."""
    raw = shared_data / "MNIST" / "raw"
    names = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte"]
    missing = [n for n in names if not ((raw / n).is_file() or (raw / (n + ".gz")).is_file())]
    if missing:
        pytest.skip(f"MNIST files {', '.join(missing)} are absent from {raw}")
    return shared_data


@pytest.fixture(scope="session")
def celebahq(shared_data: Path) -> Path:
    """The CelebA-HQ 64-px folder (images_64.zip + attribute files); never copied into the repo."""
    d = shared_data / "faces" / "celebahq64"
    if not (d / "images_64.zip").is_file() or not (d / "CelebAMask-HQ-attribute-anno.txt").is_file():
        pytest.skip(f"CelebA-HQ 64-px data is absent from {d}")
    return d
