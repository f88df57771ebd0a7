"""Transfer for the region scorer: its trunk started from the lung segmenter's encoder (the only pretraining
there is here)."""
from __future__ import annotations

import torch

from tasks.brixia import RegionScorer


def trunk_state_from_segmenter(segmenter_state: dict[str, torch.Tensor], scorer: RegionScorer) -> dict[str, torch.Tensor]:
    """The scorer trunk's weights taken from a segmenter's smp ``tu-`` encoder (the same timm network).

    The segmenter learnt lungs, heart and opacity from ~1,700 real films; its encoder is the only
    pretraining there is here. Raises ValueError naming the mismatch when the encoder is not the
    scorer's backbone (every trunk weight must be found with its shape)."""
    prefix = "encoder.model."
    encoder = {key[len(prefix):]: value for key, value in segmenter_state.items() if key.startswith(prefix)}
    wanted = scorer.trunk.state_dict()
    missing = [key for key in wanted if key not in encoder or encoder[key].shape != wanted[key].shape]
    if not encoder or missing:
        raise ValueError(f"the segmenter's encoder does not hold the scorer trunk ({len(missing)} of {len(wanted)} "
                         f"weights missing or of another shape, e.g. {missing[:2]}): train the segmenter with "
                         f"--encoder tu-<the scorer's --backbone> and an --encoder-depth >= the scorer's --stage")
    return {key: encoder[key].to(wanted[key].dtype) for key in wanted}
