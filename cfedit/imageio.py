"""Image files in and out: decoding to a model's format, PNG bytes, grids and side-by-side pairs.

Images inside cfedit are uint8 arrays [C, H, W] (C = 1 or 3). Every place that reads or writes an
image file goes through here, so the conversion rules are the same for datasets and for ``edit``.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Iterable

import numpy as np

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


class ImageReadError(ValueError):
    """An input image cannot be read (one line, naming the file)."""


def decode_image(data: bytes, size: int, channels: int, where: str = "image") -> tuple[np.ndarray, str | None]:
    """Decode to uint8 [channels, size, size]; return it and a note saying what was converted.

    A non-square image is center-cropped to a square first (faces and digits sit in the middle),
    then resized with Lanczos; the mode is converted to RGB or grayscale.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            notes = []
            mode = "RGB" if channels == 3 else "L"
            if im.mode != mode:
                notes.append(f"mode {im.mode} -> {mode}")
            im = im.convert(mode)
            w, h = im.size
            if w != h:
                s = min(w, h)
                left, top = (w - s) // 2, (h - s) // 2
                im = im.crop((left, top, left + s, top + s))
                notes.append(f"center-cropped {w}x{h} -> {s}x{s}")
            if im.size != (size, size):
                notes.append(f"resized {im.size[0]}x{im.size[1]} -> {size}x{size}")
                im = im.resize((size, size), Image.Resampling.LANCZOS)
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise ImageReadError(f"{where}: cannot decode image ({' '.join(str(e).split())})") from None
    arr = arr[None] if channels == 1 else arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr), ("; ".join(notes) or None)


def read_image(path: str | Path, size: int, channels: int) -> tuple[np.ndarray, str | None]:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ImageReadError(f"{path}: cannot read ({e.strerror})") from None
    return decode_image(data, size, channels, str(path))


def png_bytes(image: np.ndarray) -> bytes:
    """PNG bytes of one image uint8 [C, H, W] (C = 1 or 3)."""
    from PIL import Image

    arr = np.asarray(image)
    pil = Image.fromarray(arr[0] if arr.shape[0] == 1 else np.transpose(arr, (1, 2, 0)))
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()


def image_grid(images: np.ndarray, ncol: int = 8, pad: int = 2) -> np.ndarray:
    """A contact sheet uint8 [C, H', W'] of images [n, C, H, W], ``ncol`` per row."""
    n, c, h, w = images.shape
    ncol = max(1, min(ncol, n))
    nrow = -(-n // ncol)
    out = np.full((c, nrow * (h + pad) + pad, ncol * (w + pad) + pad), 128, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        out[:, y:y + h, x:x + w] = images[i]
    return out


def side_by_side(*images: np.ndarray, pad: int = 2) -> np.ndarray:
    """original | counterfactual (| ...) as one uint8 image."""
    return image_grid(np.stack(images), ncol=len(images), pad=pad)


def to_uint8(images) -> np.ndarray:
    """Float images in [0, 1] (numpy or torch) → uint8."""
    arr = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    if arr.dtype == np.uint8:
        return arr
    return (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def gather_image_paths(args: Iterable[str], stdin=None) -> tuple[list[Path], list[str]]:
    """Expand files, directories (their images, sorted) and '-' (paths on stdin, one per line).

    Returns (paths, problems): a missing path is a problem to report, not a reason to stop.
    """
    paths: list[Path] = []
    problems: list[str] = []
    for a in args:
        if a == "-":
            stream = stdin or sys.stdin
            for line in stream:
                if line.strip():
                    paths.append(Path(line.strip()))
            continue
        p = Path(a)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                problems.append(f"{p}: folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            paths.extend(found)
        elif p.exists():
            paths.append(p)
        else:
            problems.append(f"{p}: no such file or folder")
    return paths, problems
