"""Output checks: measures of a request's input or result, held against the ranges its card recorded from training data.

A task defines its measures once (``tasks.<task>.quality_measures``: plain numbers such as an
aspect ratio, a saturation, the pieces a bone mask falls into) and both sides call them: the
trainer on its training images (``record_ranges`` -> the card's ``quality`` record), the daemon
on every request (``assess`` -> the reply's ``quality: {"ok", "reasons"}``). The ranges are the
observed minimum and maximum widened by the recorded ``margin`` times the larger of their span
and the median's size, so a measure that never varied in training still tolerates small changes.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

NOT_RECORDED = "the model card records no quality ranges (retrain, or run python -m train.quality)"


def record_ranges(samples: Sequence[Mapping[str, float]], *, margin: float, source: str,
                  parameters: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The card's ``quality`` record from the measures of every training image."""
    if not samples:
        raise ValueError("quality ranges need at least one training sample")
    names = sorted({name for sample in samples for name in sample})
    ranges = {}
    for name in names:
        values = np.array([sample[name] for sample in samples if name in sample], dtype=np.float64)
        low, high, median = float(values.min()), float(values.max()), float(np.median(values))
        slack = margin * max(high - low, abs(median))
        ranges[name] = {"min": round(low - slack, 6), "max": round(high + slack, 6)}
    return {"source": source, "n": len(samples), "margin": margin, "parameters": dict(parameters or {}),
            "ranges": ranges}


def assess(measures: Mapping[str, float], record: Mapping[str, Any] | None,
           labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``{"ok": bool, "reasons": [...]}``: every recorded measure of this request inside its range.

    ``labels`` names measures for people (``pieces.Radius`` -> ``Radius: pieces``). Without a
    record the check cannot be made: ``ok`` is null and the reason says so.
    """
    if not record or not record.get("ranges"):
        return {"ok": None, "reasons": [NOT_RECORDED]}
    reasons = []
    for name, bounds in record["ranges"].items():
        if name not in measures:
            continue
        value = float(measures[name])
        if not bounds["min"] <= value <= bounds["max"]:
            shown = (labels or {}).get(name, name)
            reasons.append(f"{shown} {value:.4g} is outside {bounds['min']:.4g} to {bounds['max']:.4g}, "
                           f"the range of the {record.get('n', 'training')} training images")
    return {"ok": not reasons, "reasons": reasons}
