"""The scar seed's checkpoints -> our state dicts and architecture records.

The seed saved ``{"epoch", "state_dict", "best_prec1", "optimizer"(, "arch")}`` with
DataParallel's ``module.`` prefixes. Its ResNet, MLP and fusion parameter names are ours except
the CBAM gates (``cbam.ChannelGate.mlp.1`` is our ``cbam.channel.mlp.0``; a Flatten sat at index
0). Which model a checkpoint holds, and its depth, width, head and feature count, are read from
the tensor names and shapes. The seed never saved its clinical scaler; ``seed_feature_order``
rebuilds its column order and the scaler from its training table.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from tasks import scar
from tasks.weights import strip_module_prefix

_CBAM_RENAMES = (
    (re.compile(r"\.cbam\.ChannelGate\.mlp\.1\."), ".cbam.channel.mlp.0."),
    (re.compile(r"\.cbam\.ChannelGate\.mlp\.3\."), ".cbam.channel.mlp.2."),
    (re.compile(r"\.cbam\.SpatialGate\.spatial\."), ".cbam.spatial."),
)
# The only columns the seed standardised; it appended them, scaled, after the other columns.
SEED_SCALED_COLUMNS = ("age", "BMI", "Delta_date")


def seed_state_dict(checkpoint: Any) -> dict[str, torch.Tensor]:
    """A seed checkpoint (loaded with ``weights_only=True``) as a state dict with our parameter names."""
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("state_dict"), Mapping):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, Mapping) or not checkpoint or \
            not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ValueError("not a scar checkpoint: expected a state dict (or a dict with 'state_dict') of tensors")
    state = {}
    for key, value in strip_module_prefix(checkpoint).items():
        key = f".{key}"
        for pattern, replacement in _CBAM_RENAMES:
            key = pattern.sub(replacement, key)
        state[key[1:]] = value
    return state


def model_kind(state: Mapping[str, torch.Tensor]) -> str:
    """image, clinical or combined, from the parameter names."""
    if any(k.startswith("cnn.") for k in state) and any(k.startswith("mlp.") for k in state):
        return "combined"
    if "layer1.0.conv1.weight" in state:
        return "image"
    if "fc4.weight" in state and "bn1.running_mean" in state:
        return "clinical"
    raise ValueError("cannot tell which scar model this is (no ResNet 'layer1', MLP 'fc4' or fusion 'cnn.'/'mlp.')")


def _image_record(state: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, Any]:
    width = int(state[f"{prefix}conv1.weight"].shape[0])
    layers = []
    for stage in range(1, 5):
        blocks = {int(m.group(1)) for k in state for m in [re.match(rf"{re.escape(prefix)}layer{stage}\.(\d+)\.", k)] if m}
        layers.append(len(blocks))
    fc = sorted(int(m.group(1)) for k in state for m in [re.fullmatch(rf"{re.escape(prefix)}fc(\d+)\.weight", k)] if m)
    head = [int(state[f"{prefix}fc{i}.weight"].shape[0]) for i in fc[:-1]]
    num_classes = int(state[f"{prefix}fc{fc[-1]}.weight"].shape[0])
    channels = int(state[f"{prefix}layer1.0.cbam.channel.mlp.0.weight"].shape[1])
    hidden = int(state[f"{prefix}layer1.0.cbam.channel.mlp.0.weight"].shape[0])
    return scar.image_architecture(width=width, layers=layers, head=head, reduction=max(1, channels // hidden),
                                   num_classes=num_classes)


def _clinical_record(state: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, Any]:
    hidden = [int(state[f"{prefix}fc{i}.weight"].shape[0]) for i in (1, 2, 3)]
    return scar.clinical_architecture(int(state[f"{prefix}fc1.weight"].shape[1]), hidden=hidden,
                                      num_classes=int(state[f"{prefix}fc4.weight"].shape[0]))


def architecture_of(state: Mapping[str, torch.Tensor], model: str) -> dict[str, Any]:
    """The architecture record that ``state`` loads into strictly."""
    if model == "image":
        return _image_record(state)
    if model == "clinical":
        return _clinical_record(state)
    return scar.combined_architecture(_image_record(state, "cnn."), _clinical_record(state, "mlp."))


def seed_feature_order(columns: Sequence[str], label_column: str = "Cls", id_column: str = "img_name") -> list[str]:
    """The seed's model input order for a table header: other columns as they come, then age, BMI, Delta_date.

    (The seed dropped the three raw columns and appended their scaled versions at the end.)
    """
    rest = [c for c in columns if c not in (label_column, id_column, *SEED_SCALED_COLUMNS)]
    return rest + [c for c in SEED_SCALED_COLUMNS if c in columns]


def seed_scaler(matrix: np.ndarray, names: Sequence[str]) -> dict[str, list[float]]:
    """The seed's standardisation as one scaler: age, BMI and Delta_date standardised, the rest passed through."""
    fitted = scar.fit_scaler(matrix)
    keep = [name in SEED_SCALED_COLUMNS for name in names]
    return {"mean": [m if k else 0.0 for m, k in zip(fitted["mean"], keep)],
            "scale": [s if k else 1.0 for s, k in zip(fitted["scale"], keep)]}
