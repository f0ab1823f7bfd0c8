"""Turn a ``device`` config value into a ``torch.device``, failing clearly when it is absent."""

from __future__ import annotations

import torch

from mas.errors import ConfigError

__all__ = ["resolve_device"]


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto``; a CUDA device that is absent is a clear error.

    Raises:
        ConfigError: the device names CUDA but this machine has no such device.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={name} but CUDA is not available on this machine (use device=cpu)")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device={name} but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device
