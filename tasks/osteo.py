"""Osteoporosis from panoramic dental X-rays: labels, network and preprocessing (seed 001).

The seed's pipeline, kept exactly: 8-bit grayscale -> rolling-ball background subtraction
(radius 180, sliding paraboloid) -> resize to 449x954 (HxW, a third of a ~1348x2863 panoramic)
-> gray to RGB -> ImageNet normalisation -> EfficientNet with two outputs (C1 healthy, C3
osteoporosis).
"""
from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch
from PIL import Image

from tasks.nets.efficientnet import pad_in_convolutions, use_native_swish
from tasks.rolling_ball import subtract_background

TASK = "osteo"
INPUT_SIZE = (449, 954)  # (height, width), as the seed's Resize((449, 954))
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ROLLING_BALL_RADIUS = 180

# Label sets the seed knows. The file name of a seed checkpoint containing "C2C3" selects the
# second (C1 vs C2+C3 "diseased bone") variant.
LABELS_C1_C3 = ["C1", "C3"]
LABELS_C1_C2C3 = ["C1", "C2C3"]
DIAGNOSES = {
    "C1": "Healthy Patient",
    "C3": "Patient with Osteoporosis",
}
DIAGNOSES_C2C3 = {
    "C1": "Healthy Bone",
    "C2C3": "Diseased Bone",
}
VARIANT_PATTERN = re.compile(r"efficientnet-(b[0-7])")


def default_input_spec(size: tuple[int, int] = INPUT_SIZE) -> dict[str, Any]:
    """The card's ``input`` record for an osteo model (what goes in, as the seed fed it)."""
    return {
        "size": list(size),
        "channels": 3,
        "color": "gray->rgb",
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "rolling_ball_radius": ROLLING_BALL_RADIUS,
    }


def default_architecture(variant: str = "efficientnet-b0", num_classes: int = 2,
                         **override_params: Any) -> dict[str, Any]:
    """The card's ``architecture`` record: an efficientnet-pytorch variant with optional overrides.

    ``override_params`` are efficientnet-pytorch global params (e.g. ``width_coefficient``,
    ``depth_coefficient``) so that a scaled-down network can serve as demo weights.
    """
    if not re.fullmatch(r"efficientnet-b[0-7]", variant):
        raise ValueError(f"unknown EfficientNet variant {variant!r}; use efficientnet-b0 .. efficientnet-b7")
    return {"name": "efficientnet-pytorch", "variant": variant, "num_classes": num_classes,
            "override_params": dict(override_params)}


def build_network(architecture: dict[str, Any]) -> torch.nn.Module:
    """An untrained EfficientNet as the card describes it (weights are loaded by the caller), with
    native SiLU and in-convolution padding (tasks.nets.efficientnet: same parameters, same function)."""
    from efficientnet_pytorch import EfficientNet

    if architecture.get("name") != "efficientnet-pytorch":
        raise ValueError(f"osteo expects an efficientnet-pytorch architecture, got {architecture.get('name')!r}")
    overrides = dict(architecture.get("override_params") or {})
    network = EfficientNet.from_name(architecture["variant"], num_classes=int(architecture["num_classes"]), **overrides)
    return pad_in_convolutions(use_native_swish(network))


def explain_target_layer(network: torch.nn.Module) -> torch.nn.Module:
    """The layer Grad-CAM looks at: the last MBConv block (stride 32 features)."""
    return network._blocks[-1]


def diagnosis_for(labels: list[str], label: str) -> str:
    """The seed's human-readable diagnosis string for a label."""
    table = DIAGNOSES_C2C3 if "C2C3" in labels else DIAGNOSES
    return table[label]


def background_subtracted(gray: np.ndarray, radius: int = ROLLING_BALL_RADIUS) -> np.ndarray:
    """Rolling-ball (sliding paraboloid) background subtraction as the seed ran it, on 8-bit gray."""
    if gray.dtype != np.uint8 or gray.ndim != 2:
        raise ValueError("osteo preprocessing expects an 8-bit grayscale image")
    return subtract_background(gray, radius, light_background=False, use_paraboloid=True, do_presmooth=True)


def resized_gray(gray: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize to (height, width) with PIL bilinear, exactly what the seed's torchvision Resize did on a PIL image."""
    height, width = size
    return np.asarray(Image.fromarray(gray, mode="L").resize((width, height), Image.BILINEAR))


def to_tensor(gray_resized: np.ndarray, input_spec: dict[str, Any]) -> torch.Tensor:
    """Gray uint8 (H, W) -> normalised float tensor (3, H, W): gray->RGB, ToTensor, Normalize."""
    x = torch.from_numpy(gray_resized.astype(np.float32) / 255.0)
    x = x.unsqueeze(0).expand(3, -1, -1)
    mean = torch.tensor(input_spec["mean"], dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(input_spec["std"], dtype=torch.float32).view(3, 1, 1)
    return ((x - mean) / std).contiguous()


def preprocessed_gray(gray: np.ndarray, input_spec: dict[str, Any]) -> np.ndarray:
    """Rolling ball then resize: the background-subtracted 8-bit gray image at model size, which
    ``to_tensor`` turns into the network input (and the overlays are drawn on, as the seed
    de-normalised its input for them)."""
    size = tuple(input_spec.get("size", INPUT_SIZE))
    radius = int(input_spec.get("rolling_ball_radius", ROLLING_BALL_RADIUS))
    return resized_gray(background_subtracted(gray, radius), size)


def preprocess(gray: np.ndarray, input_spec: dict[str, Any]) -> tuple[torch.Tensor, np.ndarray]:
    """Full osteo preprocessing of an 8-bit gray image: the network input (3, H, W) and
    ``preprocessed_gray``, the background-subtracted gray image at model size."""
    shown = preprocessed_gray(gray, input_spec)
    return to_tensor(shown, input_spec), shown


def seed_checkpoint_spec(file_name: str) -> tuple[str, list[str]]:
    """(variant, labels) of an original seed checkpoint, read from its file name as the seed did.

    ``efficientnet-b7_..._C1_C3.pth`` -> ("efficientnet-b7", ["C1", "C3"]); a name containing
    ``C2C3`` selects the C1 vs C2+C3 labels ("Healthy Bone" / "Diseased Bone").
    """
    match = VARIANT_PATTERN.search(file_name)
    if not match:
        raise ValueError(
            f"cannot tell the EfficientNet variant from {file_name!r}: the seed reads it from the file "
            "name (efficientnet-b0 .. efficientnet-b7); rename the file or pass the variant explicitly")
    labels = LABELS_C1_C2C3 if "C2C3" in file_name else LABELS_C1_C3
    return f"efficientnet-{match.group(1)}", list(labels)


def seed_state_dict(checkpoint: Any, num_classes: int = 2) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Turn an original osteo checkpoint (loaded with ``weights_only=True``) into our 2-output state dict.

    Accepts a bare state dict or one under ``state_dict``/``model``, strips ``module.`` prefixes,
    and keeps the first ``num_classes`` rows of a wider ``_fc`` head: the seed kept
    efficientnet-pytorch's 1000-way ImageNet head and trained only logits 0 (C1) and 1 (C3).
    Returns the state dict and notes for the card.
    """
    from tasks.weights import strip_module_prefix

    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    elif isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict):
        checkpoint = checkpoint["model"]
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ValueError("not an EfficientNet state dict (expected a mapping of tensor names to tensors)")
    state = strip_module_prefix(checkpoint)
    if "_fc.weight" not in state:
        raise ValueError("checkpoint has no '_fc.weight': not an efficientnet-pytorch EfficientNet")
    notes: dict[str, Any] = {"original_head_outputs": int(state["_fc.weight"].shape[0])}
    if state["_fc.weight"].shape[0] > num_classes:
        state["_fc.weight"] = state["_fc.weight"][:num_classes].clone()
        state["_fc.bias"] = state["_fc.bias"][:num_classes].clone()
        notes["head"] = (f"kept logits 0..{num_classes - 1} of the seed's {notes['original_head_outputs']}-way "
                         "head (only those were trained)")
    return state, notes


def quality_measures(gray: np.ndarray) -> dict[str, float]:
    """What the osteo quality check (``tasks.quality``) measures of an input as read (8-bit gray, any
    size): its aspect ratio (width / height; a panoramic is about 2:1), mean brightness and contrast
    (0-1), and left-right symmetry (the correlation of the image with its mirror: a panoramic shows
    both halves of the jaw)."""
    import cv2

    height, width = gray.shape[:2]
    thumb = cv2.resize(np.ascontiguousarray(gray), (128, 64), interpolation=cv2.INTER_AREA).astype(np.float64) / 255
    mirrored = thumb[:, ::-1]
    centred, centred_mirror = thumb - thumb.mean(), mirrored - mirrored.mean()
    denominator = float(np.sqrt((centred ** 2).sum() * (centred_mirror ** 2).sum()))
    symmetry = float((centred * centred_mirror).sum() / denominator) if denominator > 0 else 0.0
    return {"aspect": width / height, "mean": float(thumb.mean()), "contrast": float(thumb.std()),
            "symmetry": symmetry}
