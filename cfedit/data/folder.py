"""Labelled image folders: images (a folder or a .zip) plus a label file, mapped onto a graph.

Label files come in two forms:

- CSV: a header ``image_id,<attribute>,...`` and one row per image (values as labels or as codes);
- the CelebA / CelebAMask-HQ attribute file: a count line, a line of attribute names, then rows
  ``name ±1 ±1 ...``. Its -1 is read as 0, so one ``codes:`` mapping (``{young: 1, old: 0}``) fits
  both this file and the 0/1 CSV of the same labels.

Each graph variable reads the column ``Variable.data_column`` through ``Variable.code_to_index``
(a column named after the variable itself, holding labels, is accepted too: that is what cfedit
writes). Images are decoded once into a uint8 array — kept in-process and, optionally, in an .npy
file in the user cache directory keyed by the source's size and mtime — so a second epoch, or a
second data set over the same files, does not decode them again.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from cfedit.errors import DataError
from cfedit.data.mnist import default_cache_dir
from cfedit.causal.pv import as_pv
from cfedit.files import atomic_write_bytes, read_regular, read_text
from cfedit.imageio import IMAGE_SUFFIXES, MAX_IMAGE_BYTES, ImageReadError, decode_image
from cfedit.causal.graph import CausalGraph

LABEL_FILES = ("labels.csv", "attributes.csv", "CelebAMask-HQ-attribute-anno.txt", "list_attr_celeba.txt")
ID_COLUMN = "image_id"
N_TEST = 3000
#: Largest label file read (CelebA's 200,000-row attribute file is 26 MiB).
MAX_LABEL_BYTES = 256 << 20


def _few(items: Sequence, k: int = 3) -> str:
    shown = ", ".join(str(x) for x in items[:k])
    return shown + (f" (and {len(items) - k} more)" if len(items) > k else "")


# --------------------------------------------------------------------------------------------
# Label files
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LabelTable:
    """A label file as strings: ``ids`` (or None), ``columns`` name -> cells, and its format."""

    path: Path
    kind: str  # "csv" or "celeba"
    ids: list[str] | None
    columns: dict[str, list[str]]
    first_line: int  # file line of row 0

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else len(self.ids or [])


_TABLES: dict[tuple, LabelTable] = {}


def read_label_table(path: str | Path) -> LabelTable:
    """Read a labels CSV or a CelebA-style attribute file (cached by path, size and mtime)."""
    path = Path(path)
    try:
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        if key in _TABLES:
            return _TABLES[key]
    except FileNotFoundError:
        raise DataError(f"{path}: label file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read label file ({e.strerror})") from None
    text = read_text(path, MAX_LABEL_BYTES, DataError, "label file")
    lines = text.splitlines()
    first = lines[0].strip() if lines else ""
    if first.isdigit():
        table = _read_celeba(path, lines)
    else:
        table = _read_csv(path, text)
    _TABLES[key] = table
    return table


def _read_celeba(path: Path, lines: list[str]) -> LabelTable:
    if len(lines) < 2:
        raise DataError(f"{path}:2: CelebA attribute file lacks the line of attribute names")
    names = lines[1].split()
    ids: list[str] = []
    rows: list[list[str]] = []
    for ln, line in enumerate(lines[2:], start=3):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != len(names) + 1:
            raise DataError(f"{path}:{ln}: expected an image name and {len(names)} values, got {len(parts) - 1}")
        ids.append(parts[0])
        rows.append(["0" if c == "-1" else c for c in parts[1:]])
    declared = int(lines[0].strip())
    if declared != len(rows):
        raise DataError(f"{path}:1: the file declares {declared} rows but holds {len(rows)}")
    cols = {n: [r[j] for r in rows] for j, n in enumerate(names)}
    return LabelTable(path, "celeba", ids, cols, 3)


def _read_csv(path: Path, text: str) -> LabelTable:
    reader = csv.reader(io.StringIO(text))
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise DataError(f"{path}: empty label file") from None
    if len(set(header)) != len(header):
        dup = next(h for h in header if header.count(h) > 1)
        raise DataError(f"{path}:1: duplicate column {dup!r}")
    rows = []
    for ln, row in enumerate(reader, start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != len(header):
            raise DataError(f"{path}:{ln}: expected {len(header)} cells (as in the header), got {len(row)}")
        rows.append([c.strip() for c in row])
    cols = {h: [r[j] for r in rows] for j, h in enumerate(header)}
    ids = cols.pop(ID_COLUMN, None)
    return LabelTable(path, "csv", ids, cols, 2)


def _factor_indices(graph: CausalGraph, table: LabelTable) -> np.ndarray:
    """Value indices [n, k] of every graph variable, read from the table's columns."""
    n = len(table)
    out = np.empty((n, len(graph.names)), dtype=np.int64)
    missing = []
    bad: list[str] = []
    n_bad = 0
    for j, var in enumerate(graph.variables):
        if var.data_column in table.columns:
            col, as_label = var.data_column, False
        elif var.name in table.columns:
            col, as_label = var.name, True
        else:
            missing.append(var.data_column if var.column else var.name)
            continue
        lookup: dict[str, int | None] = {}
        for cell in set(table.columns[col]):
            idx = None if as_label else var.code_to_index(cell)
            if idx is None and cell in var.values:  # labels are accepted where codes are expected
                idx = var.values.index(cell)
            lookup[cell] = idx
        cells = table.columns[col]
        vals = np.fromiter((-1 if lookup[c] is None else lookup[c] for c in cells), dtype=np.int64, count=n)
        out[:, j] = vals
        wrong = np.flatnonzero(vals < 0)
        if len(wrong):
            n_bad += len(wrong)
            expected = ", ".join(var.values) if as_label or var.codes is None else \
                ", ".join(f"{c} ({lab})" for lab, c in var.codes)
            for r in wrong[: max(0, 3 - len(bad))]:
                bad.append(f"line {r + table.first_line} column {col!r}: {cells[r]!r} (expected {expected})")
    if missing:
        have = list(table.columns)
        raise DataError(
            f"{table.path}: column(s) {', '.join(missing)} needed by graph {graph.name!r} not found "
            f"(the file has {len(have)} columns: {_few(have, 5)})"
        )
    if n_bad:
        raise DataError(f"{table.path}: {n_bad} unknown value(s): {'; '.join(bad)}")
    return out


def load_labels(graph: CausalGraph, csv_path: str | Path) -> np.ndarray:
    """Value indices int64 [n, k] (``graph.names`` order) from a labels file, for an empirical P(V).

    Cells are labels (``red``) or, for a variable with ``codes``, codes (``1``); CelebA attribute
    files work too. A missing column or an unknown value raises :class:`DataError` naming the file,
    the line and the column.
    """
    return _factor_indices(graph, read_label_table(csv_path))


# --------------------------------------------------------------------------------------------
# Image sources
# --------------------------------------------------------------------------------------------

class _Source:
    """Images in a folder or a .zip, found by the ids of a label file."""

    def __init__(self, path: Path):
        self.path = path
        if path.is_dir():
            self.zip = None
            names = [p.name for p in os.scandir(path) if p.is_file()]
        elif path.is_file() and zipfile.is_zipfile(path):
            self.zip = zipfile.ZipFile(path)
            names = [i.filename for i in self.zip.infolist() if not i.is_dir()]
        elif path.exists():
            raise DataError(f"{path}: images must be a folder or a .zip file")
        else:
            raise DataError(f"{path}: image folder or zip not found")
        self.names = {}
        for nm in names:
            if nm.lower().endswith(tuple(IMAGE_SUFFIXES)):
                base = nm.rsplit("/", 1)[-1]
                self.names.setdefault(nm, nm)
                self.names.setdefault(base, nm)
                self.names.setdefault(base.rsplit(".", 1)[0], nm)

    def member(self, image_id: str) -> str | None:
        return self.names.get(image_id) or self.names.get(image_id.rsplit("/", 1)[-1])

    def read(self, member: str) -> bytes:
        """The bytes of one image, refused (before reading) above the image size limit."""
        if self.zip is None:
            return read_regular(self.path / member, MAX_IMAGE_BYTES, DataError, "image")
        size = self.zip.getinfo(member).file_size
        if size > MAX_IMAGE_BYTES:
            raise DataError(f"{self.path}:{member}: {size:,} bytes unpacked, over the image limit of "
                            f"{MAX_IMAGE_BYTES:,}")
        try:
            return self.zip.read(member)
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise DataError(f"{self.path}:{member}: cannot unpack ({e})") from None

    def close(self) -> None:
        if self.zip is not None:
            self.zip.close()

    def stamp(self, members: list[str]) -> tuple:
        """What the decoded cache depends on: the source's size and mtime (every file, for a folder)."""
        if self.zip is not None:
            st = self.path.stat()
            return (st.st_size, st.st_mtime_ns)
        sizes = mtimes = 0
        for m in members:
            st = (self.path / m).stat()
            sizes += st.st_size
            mtimes = max(mtimes, st.st_mtime_ns)
        return (sizes, mtimes)


def _decode(data: bytes, size: int, channels: int, where: str) -> np.ndarray:
    try:
        return decode_image(data, size, channels, where)[0]
    except ImageReadError as e:
        raise DataError(str(e)) from None


_DECODED: dict[str, np.ndarray] = {}
_DECODED_LOCK = threading.Lock()
_DECODED_MAX = 4


# --------------------------------------------------------------------------------------------
# The data set
# --------------------------------------------------------------------------------------------

class ImageFolderDataset:
    """Labelled images for a graph: ``factors`` (int64 [n, k]), ``images`` (uint8 [n, C, S, S]).

    ``images``: a folder or a .zip; ``labels``: a CSV or CelebA attribute file whose ids name the
    images (with or without extension). ``size`` defaults to the graph's image size, channels to the
    graph's. ``indices`` selects rows of the label file (only those images are decoded). Items are
    ``(float image in [0, 1], long factors)`` for a DataLoader. ``disk_cache`` also keeps the decoded
    array as an .npy in ``cache_dir`` (default: the user cache directory).
    """

    def __init__(self, graph: CausalGraph, images: str | Path, labels: str | Path, size: int | None = None,
                 indices: Sequence[int] | np.ndarray | None = None, disk_cache: bool = False,
                 cache_dir: str | Path | None = None, workers: int | None = None):
        self.graph = graph
        self.images_path, self.labels_path = Path(images), Path(labels)
        self.size = int(size or graph.image.size)
        self.channels = graph.image.channels
        table = read_label_table(self.labels_path)
        if table.ids is None:
            raise DataError(f"{self.labels_path}: no {ID_COLUMN!r} column naming each row's image")
        factors = _factor_indices(graph, table)
        n_all = len(table)
        if indices is None:
            rows = np.arange(n_all)
        else:
            rows = np.asarray(indices, dtype=np.int64).reshape(-1)
            out_of_range = rows[(rows < 0) | (rows >= n_all)]
            if len(out_of_range):
                raise DataError(f"{self.labels_path}: row indices {_few(out_of_range.tolist())} are out of "
                                f"range (the file has {n_all} rows)")
        if len(rows) == 0:
            raise DataError(f"{self.labels_path}: no rows selected")
        self.indices = rows
        self.factors: np.ndarray = factors[rows]
        self.ids: list[str] = [table.ids[r] for r in rows]

        src = _Source(self.images_path)
        members = [src.member(i) for i in self.ids]
        lost = [i for i, m in zip(self.ids, members) if m is None]
        if lost:
            raise DataError(f"{self.images_path}: {len(lost)} image(s) listed in {self.labels_path.name} "
                            f"not found: {_few(lost)}")
        try:
            self.images: np.ndarray = self._decoded(src, members, disk_cache, cache_dir, workers)
        finally:
            src.close()

    def _decoded(self, src: _Source, members: list[str], disk_cache: bool, cache_dir, workers) -> np.ndarray:
        h = hashlib.sha256()
        h.update(repr((str(src.path.resolve()), src.stamp(members), self.size, self.channels)).encode())
        h.update("\0".join(members).encode())
        key = h.hexdigest()[:32]
        with _DECODED_LOCK:
            if key in _DECODED:
                return _DECODED[key]
        cache_file = Path(cache_dir or default_cache_dir() / "images") / f"{key}.npy"
        arr = None
        if disk_cache and cache_file.is_file():
            try:
                arr = np.load(cache_file, allow_pickle=False)
                if arr.shape != (len(members), self.channels, self.size, self.size) or arr.dtype != np.uint8:
                    arr = None
            except (OSError, ValueError):
                arr = None
        if arr is None:
            blobs = [src.read(m) for m in members]
            arr = np.empty((len(members), self.channels, self.size, self.size), dtype=np.uint8)

            def work(i: int) -> None:
                arr[i] = _decode(blobs[i], self.size, self.channels, f"{src.path}:{members[i]}")

            with ThreadPoolExecutor(workers or min(16, os.cpu_count() or 1)) as pool:
                list(pool.map(work, range(len(members))))
            if disk_cache:
                self._save_cache(cache_file, arr)
        arr.flags.writeable = False
        with _DECODED_LOCK:
            while len(_DECODED) >= _DECODED_MAX:
                _DECODED.pop(next(iter(_DECODED)))
            _DECODED[key] = arr
        return arr

    @staticmethod
    def _save_cache(path: Path, arr: np.ndarray) -> None:
        try:
            buf = io.BytesIO()
            np.save(buf, arr, allow_pickle=False)
            atomic_write_bytes(path, buf.getvalue())
        except OSError:
            pass  # a cache that cannot be written is only slower, never wrong

    def pv(self) -> np.ndarray:
        """Empirical P(V) of the selected rows, over ``graph.names``."""
        return as_pv(self.graph, self.factors)

    def __len__(self) -> int:
        return len(self.factors)

    def __getitem__(self, i):
        import torch

        return (torch.from_numpy(self.images[i].astype(np.float32) / 255.0),
                torch.from_numpy(np.array(self.factors[i], dtype=np.int64)))

    def __repr__(self) -> str:
        return (f"ImageFolderDataset({self.graph.name!r}, images={str(self.images_path)!r}, "
                f"labels={str(self.labels_path)!r}, n={len(self)}, size={self.size})")


# --------------------------------------------------------------------------------------------
# Splits and the data set of a graph
# --------------------------------------------------------------------------------------------

def heldout_split(n: int, n_test: int = N_TEST) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) row indices: the last ``n_test`` rows (at most a tenth of them) are held out."""
    k = min(int(n_test), n // 10)
    return np.arange(n - k), np.arange(n - k, n)


def folder_paths(data: str | Path) -> tuple[Path, Path]:
    """(images, labels) of a data argument: a folder, a label file, or an image .zip."""
    p = Path(data)
    if p.is_file() and not zipfile.is_zipfile(p):
        labels, d = p, p.parent
    elif p.is_file():
        labels, d = None, p.parent
    elif p.is_dir():
        labels, d = None, p
    else:
        raise DataError(f"{p}: data folder or file not found")
    if labels is None:
        found = [d / f for f in LABEL_FILES if (d / f).is_file()] or sorted(d.glob("*.csv"))
        if not found:
            raise DataError(f"{d}: no label file found (looked for {', '.join(LABEL_FILES)} or any .csv)")
        labels = found[0]
    if p.is_file() and zipfile.is_zipfile(p):
        images = p
    elif (d / "images").is_dir():
        images = d / "images"
    else:
        zips = sorted(z for z in d.glob("*.zip") if z.is_file())
        if len(zips) > 1:
            raise DataError(f"{d}: several image zips ({_few([z.name for z in zips])}); pass one of them")
        images = zips[0] if zips else d
    return images, labels
