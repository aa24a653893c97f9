"""Images as a caller holds them, to the model's uint8 [n, C, S, S] and back, so an edit returns what it got.

- PIL images (one, or a list): the model edits the center square at its own size; the change is
  upsampled onto the original (as ``cfedit edit --keep-size``), so each result is a PIL image of the
  input's size, in the model's mode (RGB, or L for one channel).
- float tensors or arrays in [0, 1], NCHW at the model's size: quantised to uint8 for the model, and
  returned as the same type, dtype and device, in [0, 1].
- uint8 arrays [n, C, S, S]: as they are.

With several samples per image, the sample axis follows the image axis ([n, K, C, S, S]; for PIL, a
list of K images per input).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from cfedit.causal.graph import CausalGraph
from cfedit.imageio import apply_change, model_view, to_uint8

Restore = Callable[[np.ndarray], Any]  # uint8 [n, K, C, S, S] -> the caller's type


def to_model(images: Any, graph: CausalGraph, samples: int = 1) -> tuple[np.ndarray, Restore]:
    """(uint8 [n, C, S, S] for the model, a function turning its uint8 [n, K, C, S, S] results back)."""
    size, channels = graph.image.size, graph.image.channels
    if _is_pil(images) or (isinstance(images, (list, tuple)) and images and all(_is_pil(i) for i in images)):
        return _from_pil(images, size, channels, samples)
    if hasattr(images, "detach"):  # a torch tensor
        return _from_float(images.detach().cpu().numpy(), size, channels, samples,
                           lambda a: _torch_like(a, images))
    arr = np.asarray(images)
    if arr.dtype == np.uint8:
        _check_shape(arr, size, channels)
        return arr, lambda out: out[:, 0] if samples == 1 else out
    return _from_float(arr, size, channels, samples, lambda a: a.astype(arr.dtype))


def _is_pil(x: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - PIL is a dependency
        return False
    return isinstance(x, Image.Image)


def _check_shape(arr: np.ndarray, size: int, channels: int) -> None:
    if arr.ndim != 4 or arr.shape[1:] != (channels, size, size):
        raise ValueError(f"images of shape {tuple(arr.shape)}: this model edits [n, {channels}, {size}, {size}] "
                         f"(NCHW at its size; PIL images of any size are also taken)")


def _from_float(arr: np.ndarray, size: int, channels: int, samples: int,
                back: Callable[[np.ndarray], Any]) -> tuple[np.ndarray, Restore]:
    _check_shape(arr, size, channels)
    if arr.size and (np.nanmin(arr) < 0 or np.nanmax(arr) > 1):
        raise ValueError("float images must lie in [0, 1]")

    def restore(out: np.ndarray) -> Any:
        out = out.astype(np.float32) / 255.0
        return back(out[:, 0] if samples == 1 else out)

    return to_uint8(arr), restore


def _torch_like(arr: np.ndarray, like) -> Any:
    import torch

    return torch.from_numpy(np.ascontiguousarray(arr)).to(device=like.device, dtype=like.dtype)


def _from_pil(images, size: int, channels: int, samples: int) -> tuple[np.ndarray, Restore]:
    from PIL import Image

    single = _is_pil(images)
    mode = "RGB" if channels == 3 else "L"
    full = [np.asarray(im.convert(mode), dtype=np.uint8) for im in ([images] if single else images)]
    full = [a[None] if channels == 1 else a.transpose(2, 0, 1) for a in full]
    seen = np.stack([model_view(Image.fromarray(a[0] if channels == 1 else a.transpose(1, 2, 0)), size, channels)
                     for a in full])

    def restore(out: np.ndarray) -> Any:
        pics = [[_to_pil(apply_change(full[i], seen[i], out[i, k])) for k in range(out.shape[1])]
                for i in range(len(full))]
        pics = [p[0] for p in pics] if samples == 1 else pics
        return pics[0] if single else pics

    return seen, restore


def _to_pil(arr: np.ndarray):
    from PIL import Image

    return Image.fromarray(arr[0] if arr.shape[0] == 1 else np.ascontiguousarray(arr.transpose(1, 2, 0)))
