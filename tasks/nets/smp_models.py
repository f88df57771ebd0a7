"""segmentation-models-pytorch networks from a card's architecture record, shared by handbone and brixia."""
from __future__ import annotations

import math
from typing import Any

import torch


def create_smp(architecture: dict[str, Any], encoder_weights: str | None = None) -> torch.nn.Module:
    """``smp.create_model`` with the record's arch, encoder, channels, classes and extra ``options``.

    ``encoder_weights="imagenet"`` is for training only; it downloads and fails offline, with a
    message that says what to do.
    """
    import segmentation_models_pytorch as smp

    options = dict(architecture.get("options") or {})
    if "decoder_channels" in options:
        options["decoder_channels"] = tuple(options["decoder_channels"])
    try:
        return smp.create_model(architecture["arch"], encoder_name=architecture["encoder"],
                                encoder_weights=encoder_weights, in_channels=int(architecture["in_channels"]),
                                classes=int(architecture["classes"]), **options)
    except Exception as exc:  # download failures come as OSError, URLError, hub errors...
        if encoder_weights is None:
            raise
        raise RuntimeError(f"cannot load {encoder_weights} weights for encoder {architecture['encoder']!r} "
                           f"({type(exc).__name__}: {exc}); they are downloaded on first use, so this "
                           "needs internet access or a filled torch/timm cache. Train from scratch with "
                           "--encoder-weights none") from exc


def set_output_prior(network: torch.nn.Module, prior: float) -> torch.nn.Module:
    """Start the segmentation head's bias at the logit of ``prior`` (the share of pixels a class covers).

    From a bias of 0 every pixel starts at probability 0.5 and the first epochs are spent learning
    that most pixels are background.
    """
    head = getattr(network, "segmentation_head", None)
    if head is not None and getattr(head[0], "bias", None) is not None:
        torch.nn.init.constant_(head[0].bias, math.log(prior / (1 - prior)))
    return network
