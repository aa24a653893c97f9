"""Devices: ``--device auto|cpu|cuda|cuda:N`` to a torch device string; nothing hard-codes "cuda"."""

from __future__ import annotations

from cfedit.errors import DeviceError


def resolve_device(device: str) -> str:
    """``auto`` is cuda when available, else cpu; anything else must be a cpu or an available cuda device."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        d = torch.device(device)
    except RuntimeError:
        raise DeviceError(f"--device: unknown device {device!r} (auto, cpu, cuda, cuda:N)") from None
    if d.type not in ("cpu", "cuda"):
        raise DeviceError(f"--device: {device!r} is not one cfedit runs on (auto, cpu, cuda, cuda:N)")
    if d.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"--device {device}: no CUDA device is available here (use --device cpu or auto)")
    return device
