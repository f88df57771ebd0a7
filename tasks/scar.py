"""Post-thyroidectomy scar severity (seed 000): labels, the three networks, photo and clinical preprocessing.

Three models answer: ``image`` (CBAM-ResNet over a photo resized to 224x224 with the seed's
mean/std), ``clinical`` (MLP over the numeric clinical features, standardised with the scaler
fitted on the training fold) and ``combined`` (their late fusion). A card's ``architecture``
holds one record per model; its ``folds`` entries say which model (``"model"``) and fold
(``"fold"``) each weight file is, and clinical/combined entries carry their fold's scaler
(``"scaler": {"mean": [...], "scale": [...]}``) in the order of ``clinical_features.names``.
Trainers and the daemon both call these functions, so training and serving cannot drift apart.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from tasks.nets.cbam import CBAMResNet, default_head
from tasks.nets.late_fusion import ClinicalHeld, ClinicalMLP, LateFusion

TASK = "scar"
MODES = ("image", "clinical", "combined")
LABELS = ["0", "1", "2", "3"]  # severity grades; the seed published no class names
INPUT_SIZE = (224, 224)
# The seed's normalisation, measured on its scar photos (not ImageNet's).
SEED_MEAN = (0.5959581200688205, 0.46351973281645936, 0.4014567226013591)
SEED_STD = (0.07559669492871386, 0.0801965185805582, 0.08250758011366909)
FUSION_WEIGHTS = (0.6, 0.4)  # image, clinical: the seed's fixed late-fusion weights


class ClinicalFeatureError(ValueError):
    """Clinical values that cannot be fed to the model; the message names every offending feature."""


# ----------------------------------------------------------------------------- card records
def default_input_spec(size: Sequence[int] = INPUT_SIZE) -> dict[str, Any]:
    """The card's ``input`` record for the photo branch."""
    return {"size": [int(size[0]), int(size[1])], "channels": 3, "color": "rgb",
            "resize": "PIL bilinear (antialiased), aspect ratio not kept, as torchvision Resize((224, 224))",
            "mean": list(SEED_MEAN), "std": list(SEED_STD)}


def image_architecture(width: int = 64, layers: Sequence[int] = (3, 4, 6, 3), head: Sequence[int] | None = None,
                       dropout: float = 0.5, reduction: int = 16, num_classes: int = len(LABELS)) -> dict[str, Any]:
    """Record of the CBAM-ResNet image model (width 64, layers [3, 4, 6, 3] is the seed's ResNet-50)."""
    return {"name": "cbam-resnet", "block": "bottleneck", "layers": [int(n) for n in layers], "width": int(width),
            "head": [int(n) for n in (head if head is not None else default_head(width))],
            "dropout": float(dropout), "reduction": int(reduction), "num_classes": int(num_classes)}


def clinical_architecture(n_features: int, hidden: Sequence[int] = (32, 64, 32), dropout: float = 0.5,
                          num_classes: int = len(LABELS)) -> dict[str, Any]:
    """Record of the clinical MLP (11-32-64-32-4 in the seed)."""
    return {"name": "clinical-mlp", "n_features": int(n_features), "hidden": [int(n) for n in hidden],
            "dropout": float(dropout), "num_classes": int(num_classes)}


def combined_architecture(image: dict[str, Any], clinical: dict[str, Any],
                          weights: Sequence[float] = FUSION_WEIGHTS) -> dict[str, Any]:
    """Record of the late-fusion model; it embeds its two branches' records."""
    return {"name": "late-fusion", "image": image, "clinical": clinical,
            "image_weight": float(weights[0]), "clinical_weight": float(weights[1])}


def build_network(model: str, architecture: Mapping[str, Any]) -> torch.nn.Module:
    """An untrained network of ``model`` (image/clinical/combined) from its architecture record."""
    name = architecture.get("name")
    if model == "image" and name == "cbam-resnet":
        return CBAMResNet(layers=architecture["layers"], width=architecture["width"],
                          num_classes=architecture["num_classes"], head=architecture["head"],
                          dropout=architecture["dropout"], reduction=architecture["reduction"])
    if model == "clinical" and name == "clinical-mlp":
        return ClinicalMLP(architecture["n_features"], architecture["num_classes"], architecture["hidden"],
                           architecture["dropout"])
    if model == "combined" and name == "late-fusion":
        return LateFusion(build_network("image", architecture["image"]),
                          build_network("clinical", architecture["clinical"]),
                          num_classes=architecture["image"]["num_classes"],
                          image_weight=architecture["image_weight"], clinical_weight=architecture["clinical_weight"])
    raise ValueError(f"scar has no {model!r} model with architecture {name!r} "
                     f"(expected image/cbam-resnet, clinical/clinical-mlp or combined/late-fusion)")


def explain_target_layer(network: torch.nn.Module) -> torch.nn.Module:
    """Grad-CAM's layer: the image branch's last CBAM bottleneck (stride 32 features)."""
    if isinstance(network, ClinicalHeld):
        network = network.fusion
    if isinstance(network, LateFusion):
        network = network.cnn
    return network.layer4[-1]


# ----------------------------------------------------------------------------- photos
def resized_photo(rgb: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """(H, W, 3) uint8 photo -> (h, w, 3) uint8 at model size, PIL bilinear as the seed's Resize on a PIL image."""
    height, width = int(size[0]), int(size[1])
    return np.asarray(Image.fromarray(rgb, mode="RGB").resize((width, height), Image.BILINEAR))


def photo_tensor(resized: np.ndarray, input_spec: Mapping[str, Any]) -> torch.Tensor:
    """uint8 (h, w, 3) at model size -> normalised float (3, h, w): ToTensor + Normalize(seed mean/std)."""
    x = torch.from_numpy(np.array(resized, dtype=np.uint8)).permute(2, 0, 1).float() / 255.0  # a copy: PIL arrays are read-only
    mean = torch.tensor(input_spec["mean"], dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(input_spec["std"], dtype=torch.float32).view(3, 1, 1)
    return ((x - mean) / std).contiguous()


def preprocess_photo(rgb: np.ndarray, input_spec: Mapping[str, Any]) -> torch.Tensor:
    """A photo as read by ``tasks.imaging.read_image(color="rgb")`` -> the image branch's input."""
    return photo_tensor(resized_photo(rgb, input_spec["size"]), input_spec)


# ----------------------------------------------------------------------------- clinical features
def _is_number(value: Any) -> bool:
    # bool is an int in Python, but "BMI": true is a client bug, not a number.
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))


def clinical_vector(values: Any, names: Sequence[str]) -> np.ndarray:
    """The features ``names`` (in that order) from a ``{"name": number}`` mapping, as float64.

    Raises ClinicalFeatureError naming every missing, unknown or non-numeric (bool, string,
    NaN, infinity) feature at once, so a client can fix its request in one go.
    """
    if not isinstance(values, Mapping):
        raise ClinicalFeatureError(f"'clinical' must be an object of the {len(names)} features "
                                   f"{', '.join(names)}; got {type(values).__name__}")
    problems = []
    missing = [name for name in names if name not in values]
    unknown = sorted(str(key) for key in values if key not in set(names))
    bad = [name for name in names if name in values and not _is_number(values[name])]
    if missing:
        problems.append(f"missing feature(s) {', '.join(map(repr, missing))}")
    if unknown:
        problems.append(f"unknown feature(s) {', '.join(repr(k[:64]) for k in unknown[:20])}")
    if bad:
        shown = ", ".join(f"{name!r} ({str(values[name])[:32]!r})" for name in bad)
        problems.append(f"feature(s) that are not finite numbers: {shown}")
    if problems:
        raise ClinicalFeatureError(f"clinical: {'; '.join(problems)}. Expected exactly these {len(names)} "
                                   f"numeric features: {', '.join(names)}")
    return np.array([float(values[name]) for name in names], dtype=np.float64)


def fit_scaler(matrix: np.ndarray) -> dict[str, list[float]]:
    """StandardScaler's fit on training rows (N, F): mean and population std; a constant column gets scale 1."""
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2 or len(matrix) == 0:
        raise ValueError("the scaler needs a non-empty (rows, features) matrix")
    mean = matrix.mean(axis=0)
    scale = matrix.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    return {"mean": mean.tolist(), "scale": scale.tolist()}


def standardise(matrix: np.ndarray, scaler: Mapping[str, Sequence[float]]) -> np.ndarray:
    """(x - mean) / scale in float64, then float32 for the network: the one transform of train and serve."""
    matrix = np.asarray(matrix, dtype=np.float64)
    mean = np.asarray(scaler["mean"], dtype=np.float64)
    scale = np.asarray(scaler["scale"], dtype=np.float64)
    if matrix.shape[-1] != mean.shape[0]:
        raise ValueError(f"{matrix.shape[-1]} features given, the scaler expects {mean.shape[0]}")
    return ((matrix - mean) / scale).astype(np.float32)


def quality_measures(rgb: np.ndarray) -> dict[str, float]:
    """What the scar quality check (``tasks.quality``) measures of a photo as read (uint8 RGB): mean
    saturation (HSV, 0-1) and Hasler and Suesstrunk's colourfulness (0-1 scale). A radiograph or a
    gray scan has none of either."""
    import cv2

    thumb = cv2.resize(np.ascontiguousarray(rgb), (64, 64), interpolation=cv2.INTER_AREA).astype(np.float64) / 255
    high, low = thumb.max(axis=2), thumb.min(axis=2)
    saturation = np.where(high > 0, (high - low) / np.maximum(high, 1e-12), 0.0)
    red, green, blue = thumb[..., 0], thumb[..., 1], thumb[..., 2]
    rg, yb = red - green, 0.5 * (red + green) - blue
    colourfulness = np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean())
    return {"saturation": float(saturation.mean()), "colourfulness": float(colourfulness)}


def clinical_quality_measures(values: np.ndarray | None, names: Sequence[str]) -> dict[str, float]:
    """The clinical features as quality measures (``clinical.<name>``), so a value outside the training
    table's range is reported; none without clinical values."""
    if values is None:
        return {}
    return {f"clinical.{name}": float(value) for name, value in zip(names, values)}
