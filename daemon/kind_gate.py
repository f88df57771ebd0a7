"""The image-kind gate: before a task runs, check that its image is of the kind the task was made for.

Loaded from a ``kind`` card (``weights/kind/card.json``, trained by ``python -m train.kind``),
always on the CPU: a few small networks, run in the preprocessing workers right after the image
is decoded. A request is refused with ``wrong_image_kind`` when the picture says, with at least
the card's ``gate.refuse_at`` probability for that kind (mean over folds), that it is not of the task's kind,
or when the DICOM header rules the kind out (an MR or CT modality, a lateral chest view, another
body part). A header that names the task's own body part raises the bar the picture must clear
to ``gate.refuse_at_with_dicom_support``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from daemon.errors import WRONG_IMAGE_KIND, ServiceError
from tasks import cards, kind
from tasks.bundle import load_bundle
from tasks.imaging import DecodedImage

_CPU = torch.device("cpu")


@dataclass
class KindVerdict:
    """What the gate concluded about one image for one task."""
    kind: str                  # the most likely kind
    probabilities: np.ndarray  # (len(KINDS),) mean over folds
    refused: bool
    reason: str | None


def _per_kind(value: Any, name: str) -> dict[str, float]:
    """A card threshold, one probability for every task kind or one per kind, as ``{kind: value}``."""
    task_kinds = sorted(set(kind.TASK_KINDS.values()))
    values = value if isinstance(value, dict) else {k: value for k in task_kinds}
    if set(values) != set(task_kinds) or not all(isinstance(v, (int, float)) and 0 < v <= 1 for v in values.values()):
        raise cards.CardError(f"a kind card needs {name}: a probability in (0, 1], or one for each of "
                              f"{', '.join(task_kinds)}")
    return {k: float(v) for k, v in values.items()}


class KindGate:
    """The kind card's fold networks and thresholds; ``check`` raises ServiceError(wrong_image_kind)."""

    def __init__(self, card: dict[str, Any], networks: list[torch.nn.Module], source: str) -> None:
        gate = card.get("gate") or {}
        if list(card["labels"]) != kind.KINDS:
            raise cards.CardError(f"the kind card's labels {card['labels']} are not {kind.KINDS}")
        self.card, self.networks, self.source = card, networks, source
        self.refuse_at = _per_kind(gate.get("refuse_at"), "gate.refuse_at")
        self.refuse_at_supported = _per_kind(gate.get("refuse_at_with_dicom_support", self.refuse_at),
                                             "gate.refuse_at_with_dicom_support")
        self.ensemble = kind.fold_ensemble(networks)

    @classmethod
    def load(cls, folder: Path) -> "KindGate":
        """Read, verify (sha256) and build the kind card in ``folder``. All its folds serve, whatever
        ``--fold`` says of the tasks: the card's threshold was chosen for their mean."""
        bundle = load_bundle(folder, kind.build_network, _CPU, task=kind.TASK)
        gate = cls(bundle.card, bundle.only(), source=str(Path(folder) / cards.CARD_FILE))
        gate.probabilities(np.zeros((64, 64), np.uint8))  # first-call allocations now, not on a request
        return gate

    @property
    def model_info(self) -> dict[str, Any]:
        return {"name": self.card["name"], "version": self.card["version"], "demo": bool(self.card.get("demo", False))}

    def status(self) -> dict[str, Any]:
        """The ready line's and ``op: health``'s ``kind_gate`` record."""
        return {"on": True, "model": self.model_info, "refuse_at": self.refuse_at,
                "refuse_at_with_dicom_support": self.refuse_at_supported, "task_kinds": dict(kind.TASK_KINDS),
                "folds_used": len(self.networks)}

    def summary(self) -> dict[str, Any]:
        """What ``op: models`` shows of the kind card."""
        summary = cards.card_summary(self.card)
        summary.update(gate=self.card.get("gate"), use=self.card.get("use"), source=self.source,
                       folds_used=len(self.networks))
        return summary

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """Mean softmax over the folds for an image as decoded (gray or RGB uint8).

        Runs on one intra-op thread: networks this small gain nothing from more, and the worker
        threads calling it must not compete with the task's own inference for the cores (with two
        threads on a busy 2-core machine a call took ~40 times longer). The setting is the calling
        thread's own (OpenMP), restored afterwards.
        """
        inputs = kind.preprocess(pixels, self.card["input"])[None]
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.inference_mode():  # eval-mode forwards change no state: safe from every worker thread
                probabilities = torch.softmax(self.ensemble(inputs).float(), dim=2).mean(dim=1)
        finally:
            torch.set_num_threads(threads)
        return probabilities[0].numpy().astype(np.float64)

    def verdict(self, task: str, image: DecodedImage) -> KindVerdict:
        """Whether a request of ``task`` for ``image`` is refused, and why."""
        expected = kind.TASK_KINDS[task]
        probabilities = self.probabilities(image.pixels)
        likeliest = kind.KINDS[int(np.argmax(probabilities))]
        contradiction = kind.dicom_contradiction(image.attributes, expected)
        if contradiction is not None:
            attribute, value = contradiction
            return KindVerdict(likeliest, probabilities, True,
                               f"its DICOM {attribute} is {value!r}, which rules out {kind.DESCRIPTIONS[expected]} "
                               f"(the picture looks like {kind.DESCRIPTIONS[likeliest]}, probability "
                               f"{probabilities[kind.KINDS.index(likeliest)]:.2f})")
        limits = self.refuse_at_supported if kind.dicom_supports(image.attributes, expected) else self.refuse_at
        limit = limits[expected]
        against = 1.0 - float(probabilities[kind.KINDS.index(expected)])
        if against < limit:
            return KindVerdict(likeliest, probabilities, False, None)
        other = max((k for k in kind.KINDS if k != expected), key=lambda k: probabilities[kind.KINDS.index(k)])
        return KindVerdict(other, probabilities, True,
                           f"it looks like {kind.DESCRIPTIONS[other]} (probability "
                           f"{probabilities[kind.KINDS.index(other)]:.2f}), not {kind.DESCRIPTIONS[expected]} "
                           f"(probability {1 - against:.2f}; refused when it is below {1 - limit:.2f})")

    def check(self, task: str, image: DecodedImage) -> None:
        """Raise ServiceError(wrong_image_kind) when ``image`` is confidently not of ``task``'s kind."""
        verdict = self.verdict(task, image)
        if not verdict.refused:
            return
        expected = kind.TASK_KINDS[task]
        tasks = [name for name, k in kind.TASK_KINDS.items() if k == verdict.kind and name != task]
        hint = f"send it to {tasks[0]}, or" if tasks else "check the worklist, or"
        raise ServiceError(WRONG_IMAGE_KIND,
                           f"{task} takes {kind.DESCRIPTIONS[expected]}, and this image is not one: {verdict.reason}; "
                           f"{hint} set \"check_kind\": false to skip this check")
