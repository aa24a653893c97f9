"""Image files in and out: decoding to a model's format, PNG bytes, grids and side-by-side pairs.

Images inside cfedit are uint8 arrays [C, H, W] (C = 1 or 3). Every place that reads or writes an
image file goes through here, so the conversion rules are the same for datasets and for ``edit``.
Reading is bounded: only regular files of at most :data:`MAX_IMAGE_BYTES`, and an image's pixel
count is checked from its header, before it is decoded (:data:`MAX_PIXELS`, and the smaller
:data:`KEEP_SIZE_MAX_PIXELS` for originals edited at their own size).
"""

from __future__ import annotations

import io
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from cfedit.errors import ImageReadError  # re-exported: ``from cfedit.imageio import ImageReadError``
from cfedit.files import read_regular

#: Image files cfedit reads: the suffixes `edit` takes and a data folder indexes.
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
#: Largest image file read.
MAX_IMAGE_BYTES = 64 << 20
#: Most pixels decoded (8192 x 8192, about 200 MiB as RGB); below Pillow's looser bomb warning.
MAX_PIXELS = 8192 * 8192
#: Most pixels of an original edited at its own size (``--keep-size``): 4096 x 4096, whose working
#: arrays (the upsampled change, the float square) take about 1.5 GiB.
KEEP_SIZE_MAX_PIXELS = 4096 * 4096
# Warning filters are process-wide: silencing Pillow's bomb warning is serialised across threads.
_OPEN_LOCK = threading.Lock()


def center_square(width: int, height: int) -> tuple[int, int, int]:
    """The center square of a width x height image as (left, top, side); the whole image if square."""
    side = min(width, height)
    return (width - side) // 2, (height - side) // 2, side


@contextmanager
def _decoding(where: str):
    """Turn PIL's decoding failures into a one-line ``ImageReadError`` naming ``where``."""
    from PIL import Image, UnidentifiedImageError

    try:
        yield
    except ImageReadError:  # (a ValueError too) already one line naming the file
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise ImageReadError(f"{where}: cannot decode image ({' '.join(str(e).split())})") from None


def _open(data: bytes, where: str, max_pixels: int, purpose: str):
    """The image in ``data``, opened (its header read, nothing decoded) and refused when it has more
    than ``max_pixels``. This check replaces Pillow's multi-line DecompressionBombWarning."""
    from PIL import Image

    try:
        with _OPEN_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise ImageReadError(f"{where}: over the limit of {max_pixels:,} pixels {purpose} "
                             f"(a decompression bomb?)") from None
    w, h = im.size
    if w * h > max_pixels:
        im.close()
        raise ImageReadError(f"{where}: {w}x{h} is {w * h:,} pixels, over the limit of {max_pixels:,} "
                             f"{purpose}; resize it first")
    return im


def _open_in_mode(data: bytes, channels: int, where: str, max_pixels: int = MAX_PIXELS,
                  purpose: str = "for an image"):
    """Decode to a PIL image in the model's mode (RGB for 3 channels, else L); return it and notes.

    16-bit grayscale is scaled to 8 bits first: Pillow's own conversion clips it to black and white.
    """
    from PIL import Image

    mode = "RGB" if channels == 3 else "L"
    with _decoding(where):
        with _open(data, where, max_pixels, purpose) as im:
            notes = [f"mode {im.mode} -> {mode}"] if im.mode != mode else []
            if im.mode.startswith("I;16"):
                wide = np.asarray(im).astype(np.uint32)
                return Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8)).convert(mode), notes
            return im.convert(mode), notes


def _chw(im, channels: int) -> np.ndarray:
    arr = np.asarray(im, dtype=np.uint8)
    arr = arr[None] if channels == 1 else arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr)


def decode_image(data: bytes, size: int, channels: int, where: str = "image") -> tuple[np.ndarray, str | None]:
    """Decode to uint8 [channels, size, size]; return it and a note saying what was converted.

    A non-square image is center-cropped to a square first (faces and digits sit in the middle),
    then resized with Lanczos; the mode is converted to RGB or grayscale.
    """
    im, notes = _open_in_mode(data, channels, where)
    with _decoding(where):
        arr = model_view(im, size, channels, notes)
    return arr, ("; ".join(notes) or None)


def model_view(im, size: int, channels: int, notes: list[str] | None = None) -> np.ndarray:
    """What the model sees of a PIL image already in its mode: the center square resized (Lanczos) to
    ``size``, uint8 [channels, size, size]; what was done is appended to ``notes``."""
    from PIL import Image

    notes = [] if notes is None else notes
    w, h = im.size
    if w != h:
        left, top, s = center_square(w, h)
        im = im.crop((left, top, left + s, top + s))
        notes.append(f"center-cropped {w}x{h} -> {s}x{s}")
    if im.size != (size, size):
        notes.append(f"resized {im.size[0]}x{im.size[1]} -> {size}x{size}")
        im = im.resize((size, size), Image.Resampling.LANCZOS)
    return _chw(im, channels)


def _read_bytes(path: str | Path) -> bytes:
    return read_regular(path, MAX_IMAGE_BYTES, ImageReadError, "image")


def read_image(path: str | Path, size: int, channels: int) -> tuple[np.ndarray, str | None]:
    return decode_image(_read_bytes(path), size, channels, str(path))


def read_original(path: str | Path, channels: int) -> np.ndarray:
    """The image file at its own resolution, uint8 [channels, H, W], in the model's mode (RGB or L);
    at most :data:`KEEP_SIZE_MAX_PIXELS`, as it is to be edited at that size."""
    im, _ = _open_in_mode(_read_bytes(path), channels, str(path), KEEP_SIZE_MAX_PIXELS,
                          "for editing at its own size (--keep-size)")
    with _decoding(str(path)):
        return _chw(im, channels)


def apply_change(original_full: np.ndarray, model_input: np.ndarray, edited: np.ndarray) -> np.ndarray:
    """Apply a model-resolution edit to the full-resolution original; uint8 [C, H, W] like ``original_full``.

    ``model_input`` (uint8 [C, S, S]) is what the model saw, i.e. the center square of
    ``original_full`` (see ``center_square``) resized to S; ``edited`` (uint8 [C, S, S]) is the model's
    output. The change ``edited/255 - model_input/255`` is upsampled bilinearly (pixel centers
    aligned, i.e. align_corners=False; PIL, which also antialiases when the square is smaller than S)
    to the side of that center square, added to it, clipped to [0, 1] and rounded to uint8. Pixels
    outside the center square are returned unchanged, so a null edit returns the original exactly.
    """
    from PIL import Image

    original_full = np.asarray(original_full)
    model_input, edited = np.asarray(model_input), np.asarray(edited)
    if original_full.ndim != 3 or model_input.shape != edited.shape or model_input.ndim != 3 \
            or model_input.shape[0] != original_full.shape[0] or model_input.shape[1] != model_input.shape[2]:
        raise ValueError(f"apply_change: expected [C,H,W], [C,S,S], [C,S,S]; got "
                         f"{original_full.shape}, {model_input.shape}, {edited.shape}")
    c, h, w = original_full.shape
    s = model_input.shape[1]
    left, top, side = center_square(w, h)
    change = edited.astype(np.float32) / 255.0 - model_input.astype(np.float32) / 255.0
    if side != s:
        change = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(ch)).resize((side, side), Image.Resampling.BILINEAR))
                           for ch in change])
    out = original_full.copy()
    square = original_full[:, top:top + side, left:left + side].astype(np.float64) / 255.0 + change
    out[:, top:top + side, left:left + side] = to_uint8(square)
    return out


def png_bytes(image: np.ndarray) -> bytes:
    """PNG bytes of one image uint8 [C, H, W] (C = 1 or 3)."""
    from PIL import Image

    arr = np.asarray(image)
    pil = Image.fromarray(arr[0] if arr.shape[0] == 1 else np.transpose(arr, (1, 2, 0)))
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()


def image_grid(images: np.ndarray, ncol: int = 8, pad: int = 2) -> np.ndarray:
    """A contact sheet uint8 [C, H', W'] of images [n, C, H, W], ``ncol`` per row, on gray (128)
    padding: :func:`torchvision.utils.make_grid`, kept at the images' own channels and padded
    around a single image as well."""
    import torch
    from torchvision.utils import make_grid

    images = np.asarray(images)
    n, c = images.shape[:2]
    t = torch.from_numpy(np.ascontiguousarray(images))
    if n == 1:  # make_grid returns one image as it is; a sheet of one keeps its frame
        return np.pad(images[0], ((0, 0), (pad, pad), (pad, pad)), constant_values=128)
    # (make_grid turns one channel into three: gray images go through as RGB and come back as one)
    grid = make_grid(t.expand(-1, 3, -1, -1) if c == 1 else t, nrow=max(1, min(ncol, n)), padding=pad,
                     pad_value=128)
    return grid[:c].numpy()


def side_by_side(*images: np.ndarray, pad: int = 2) -> np.ndarray:
    """original | counterfactual (| ...) as one uint8 image."""
    return image_grid(np.stack(images), ncol=len(images), pad=pad)


def to_uint8(images) -> np.ndarray:
    """Float images in [0, 1] (numpy or torch) → uint8."""
    arr = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    if arr.dtype == np.uint8:
        return arr
    return (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
