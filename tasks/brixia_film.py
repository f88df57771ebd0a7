"""Is this a frontal chest film, the right way round? Measured on the segmenter's lung and heart masks.

A Brixia score is only meaningful on a frontal (PA/AP) film as radiologists read it: the
patient's right lung on the image's left, the heart between the lungs and leaning to the
patient's left (the image's right). A mirrored film would be scored with regions A-C and D-F
swapped; a lateral film has no two lungs side by side. ``film_measures`` turns the three masks
into a few numbers, ``film_problem`` says what is wrong with them (or None), against limits the
segmenter's trainer recorded in the card from the training masks (``default_film_limits`` are
the values measured on the 217 JSRT label maps, for cards that predate them).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from tasks.brixia_orient import DEFAULT_MIN_UPRIGHT, pose_problem

# JSRT label maps: heart lean 0.011..0.227 (median 0.116); lung share of the frame 0.069..0.250,
# heart 0.059..0.142. The limits leave room for real films (rotation, effusions, collapse).
DEFAULT_FILM_LIMITS = {"min_lung_fraction": 0.02, "max_lung_fraction": 0.45, "min_heart_fraction": 0.01,
                       "min_heart_lean": 0.0, "min_vertical_overlap": 0.5}


def default_film_limits() -> dict[str, float]:
    return dict(DEFAULT_FILM_LIMITS)


def _centre_x(mask: np.ndarray) -> float:
    cols = np.nonzero(mask.any(axis=0))[0]
    weights = mask.sum(axis=0)[cols]
    return float((cols * weights).sum() / weights.sum())


def _rows(mask: np.ndarray) -> tuple[int, int]:
    rows = np.flatnonzero(mask.any(axis=1))
    return int(rows[0]), int(rows[-1]) + 1


def film_measures(masks: np.ndarray) -> dict[str, float | None]:
    """(3, S, S) bool right lung / left lung / heart -> shares of the frame, centres and the heart's lean.

    ``heart_lean``: how far the heart's centre lies from the midpoint between the two lung centres,
    towards the left lung, as a share of their distance (positive on a frontal film the right way
    round; negative when mirrored). ``vertical_overlap``: the share of the shorter lung's height
    that the two lungs share (about 1 when they stand side by side)."""
    right, left, heart = (np.asarray(m, dtype=bool) for m in masks[:3])
    area = right.size
    measures: dict[str, float | None] = {"right_lung_fraction": right.sum() / area, "left_lung_fraction": left.sum() / area,
                                         "heart_fraction": heart.sum() / area, "right_lung_x": None, "left_lung_x": None,
                                         "heart_x": None, "heart_lean": None, "vertical_overlap": None}
    if right.any() and left.any():
        rx, lx = _centre_x(right), _centre_x(left)
        (r0, r1), (l0, l1) = _rows(right), _rows(left)
        shorter = max(1, min(r1 - r0, l1 - l0))
        measures.update(right_lung_x=rx, left_lung_x=lx,
                        vertical_overlap=max(0, min(r1, l1) - max(r0, l0)) / shorter)
        if heart.any() and lx != rx:
            hx = _centre_x(heart)
            measures.update(heart_x=hx, heart_lean=(hx - (rx + lx) / 2) / (lx - rx))
    return {key: (None if value is None else float(value)) for key, value in measures.items()}


QUALITY_LABELS = {"right_lung_fraction": "right lung area (share of the frame)",
                  "left_lung_fraction": "left lung area (share of the frame)",
                  "heart_fraction": "heart area (share of the frame)", "lung_balance": "right / left lung area",
                  "heart_lean": "heart lean towards the left lung", "vertical_overlap": "lungs side by side (shared height)"}


def quality_measures(masks: np.ndarray) -> dict[str, float]:
    """What the brixia output check (``tasks.quality``) measures of the (3, S, S) masks: each structure's
    share of the frame, the right/left lung area ratio, the heart's lean and the lungs' shared height
    (a measure that cannot be taken, e.g. the lean without a heart, is left out)."""
    m = film_measures(masks)
    measures = {key: m[key] for key in QUALITY_LABELS if m.get(key) is not None}
    if m["left_lung_fraction"]:
        measures["lung_balance"] = m["right_lung_fraction"] / m["left_lung_fraction"]
    return measures


def film_problem(masks: np.ndarray, limits: dict[str, Any] | None = None) -> str | None:
    """Why the masks do not show a frontal chest film the right way round, or None when they do."""
    limits = {**DEFAULT_FILM_LIMITS, **(limits or {})}
    m = film_measures(masks)
    for side in ("right", "left"):
        share = m[f"{side}_lung_fraction"]
        if share < limits["min_lung_fraction"]:
            return (f"no {side} lung found ({share:.1%} of the frame; at least {limits['min_lung_fraction']:.0%} "
                    "expected): brixia scores frontal chest X-rays (PA/AP)")
        if share > limits["max_lung_fraction"]:
            return (f"the {side} lung found covers {share:.0%} of the frame (at most {limits['max_lung_fraction']:.0%} "
                    "expected): not a frontal chest X-ray as the model knows them")
    if m["right_lung_x"] >= m["left_lung_x"]:
        return ("the lung on the image's left is not the patient's right lung: a mirrored (left-right flipped) "
                "film; brixia scores films as radiologists read them, patient's right on the image's left")
    if m["vertical_overlap"] < limits["min_vertical_overlap"]:
        return (f"the two lungs do not stand side by side (they share {m['vertical_overlap']:.0%} of their height): "
                "a lateral or oblique film? brixia scores frontal chest X-rays (PA/AP)")
    if m["heart_fraction"] < limits["min_heart_fraction"] or m["heart_lean"] is None:
        return "no heart found between the lungs: brixia scores frontal chest X-rays (PA/AP)"
    if not m["right_lung_x"] < m["heart_x"] < m["left_lung_x"]:
        return "the heart found does not lie between the lungs: not a frontal chest X-ray as the model knows them"
    if m["heart_lean"] < limits["min_heart_lean"]:
        return (f"the heart leans to the image's left between the lungs (lean {m['heart_lean']:+.2f}; at least "
                f"{limits['min_heart_lean']:+.2f} expected): a mirrored (left-right flipped) film? brixia scores "
                "films as radiologists read them, patient's right on the image's left")
    return None


def film_refusal(masks: np.ndarray, limits: dict[str, Any] | None = None, pose: np.ndarray | None = None,
                 min_upright: float | None = None) -> str | None:
    """The whole film check, as the daemon runs it and the trainer records it: the pose classifier's
    verdict first (when its probabilities ``pose`` are given), then the anatomy of the masks; why the
    film is refused, or None."""
    if pose is not None:
        problem = pose_problem(pose, DEFAULT_MIN_UPRIGHT if min_upright is None else min_upright)
        if problem is not None:
            return problem
    return film_problem(masks, limits)


def limits_from_masks(mask_sets: Sequence[np.ndarray], margin: float = 0.5) -> dict[str, Any]:
    """Film limits from training masks with a heart: the observed ranges widened by ``margin`` of their
    span (lung share) and the heart-lean floor at min(0, lowest observed lean - margin x its spread).
    Returns the limits with the measured ranges beside them, for the card."""
    measures = [film_measures(m) for m in mask_sets]
    measures = [m for m in measures if m["heart_lean"] is not None]
    if not measures:
        return {**default_film_limits(), "source": "defaults (no training masks with both lungs and a heart)"}
    lungs = np.array([[m["right_lung_fraction"], m["left_lung_fraction"]] for m in measures]).ravel()
    leans = np.array([m["heart_lean"] for m in measures])
    hearts = np.array([m["heart_fraction"] for m in measures])
    span = float(lungs.max() - lungs.min())
    limits = {
        "min_lung_fraction": round(max(0.005, float(lungs.min()) - margin * span), 4),
        "max_lung_fraction": round(min(0.9, float(lungs.max()) + margin * span), 4),
        "min_heart_fraction": round(max(0.002, float(hearts.min()) / 4), 4),
        "min_heart_lean": round(min(0.0, float(leans.min()) - margin * float(leans.std())), 4),
        "min_vertical_overlap": DEFAULT_FILM_LIMITS["min_vertical_overlap"],
    }
    limits["measured"] = {"n": len(measures),
                          "lung_fraction": [round(float(lungs.min()), 4), round(float(lungs.max()), 4)],
                          "heart_fraction": [round(float(hearts.min()), 4), round(float(hearts.max()), 4)],
                          "heart_lean": [round(float(leans.min()), 4), round(float(np.median(leans)), 4),
                                         round(float(leans.max()), 4)]}
    return limits
