"""Weight files: safetensors only, so loading a model never unpickles anything.

Trainers and the checkpoint importer save through ``save_state_dict``; the daemon's registry
loads through ``load_state_dict``. Demo weights may be stored as float16 to keep git small;
they are widened back to float32 on load.
"""
from __future__ import annotations

import os
from typing import Mapping

import torch
from safetensors.torch import load_file, save_file


def save_state_dict(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike,
                    *, half: bool = False) -> None:
    """Save a state dict as safetensors; floating tensors go to float16 when ``half``."""
    tensors = {}
    for key, value in state_dict.items():
        value = value.detach().to("cpu").contiguous()
        if half and value.is_floating_point():
            value = value.to(torch.float16)
        tensors[key] = value
    tmp = f"{os.fspath(path)}.tmp"
    save_file(tensors, tmp)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a safetensors file to CPU, with floating tensors widened to float32."""
    tensors = load_file(os.fspath(path), device="cpu")
    return {key: value.float() if value.is_floating_point() else value for key, value in tensors.items()}


def strip_module_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the ``module.`` prefix that DataParallel/DDP checkpoints carry."""
    return {key[len("module."):] if key.startswith("module.") else key: value
            for key, value in state_dict.items()}
