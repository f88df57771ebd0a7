"""Find the model cards under WEIGHTS, verify and load every model once, and pick the device.

A task whose card is missing, malformed, tampered with (sha256 mismatch) or fails to build is
recorded as unavailable with the reason; the other tasks still serve. A ``kind`` card is not a
task: it becomes the image-kind gate every handler checks its images with; without one (or
with ``--no-kind-check``) the tasks serve ungated and the ready line says why. A single seed ``.pth``
file instead of a folder is imported on the fly as an osteo model, as the seed's run_model.py
read it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from daemon.handlers import HANDLERS, handler_class
from daemon.handlers.base import Settings, TaskHandler
from daemon.kind_gate import KindGate
from daemon.protocol import TASKS
from tasks import cards, kind, osteo
from tasks.bundle import build_bundle

log = logging.getLogger("daemon.registry")


@dataclass
class Registry:
    """What the daemon serves: a handler per available task, a reason per unavailable one."""
    handlers: dict[str, TaskHandler] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    kind_gate: KindGate | None = None
    kind_gate_off: str = "no kind card loaded"  # why there is no gate, when there is none

    def gate_status(self) -> dict[str, Any]:
        """Whether the image-kind gate is on, with what card and thresholds (the ready line and ``op: health``)."""
        if self.kind_gate is None:
            return {"on": False, "reason": self.kind_gate_off}
        return self.kind_gate.status()

    def status(self) -> dict[str, Any]:
        """Per task: available or the reason it is not (the ready line and ``op: health``)."""
        report: dict[str, Any] = {task: {"available": True, "model": handler.model_info,
                                         "device": str(handler.settings.device)}
                                  for task, handler in self.handlers.items()}
        report.update({task: {"available": False, "reason": reason} for task, reason in self.unavailable.items()})
        return report

    def models(self) -> list[dict[str, Any]]:
        """Every loaded card's summary (``op: models``)."""
        listing = []
        for task, handler in self.handlers.items():
            summary = cards.card_summary(handler.card)
            summary["source"] = handler.source
            summary["folds_used"] = handler.bundle.folds_used()
            listing.append(summary)
        if self.kind_gate is not None:
            listing.append(self.kind_gate.summary())
        return listing


def pick_device(requested: str) -> torch.device:
    """``auto`` -> CUDA when present else CPU; ``cuda`` without CUDA falls back to CPU with a warning."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        log.warning("--device %s asked for CUDA but none is available: running on CPU", requested)
        return torch.device("cpu")
    return device


def _load_card_folder(folder: Path, settings: Settings) -> TaskHandler:
    task = cards.read_card(folder)["task"]
    if task not in HANDLERS:
        raise cards.CardError(f"this daemon version has no handler for task {task!r}")
    handler = handler_class(task).load(folder, settings)
    handler.warm_up()
    return handler


def _load_seed_checkpoint(path: Path, settings: Settings) -> TaskHandler:
    """Serve an original osteo ``model.pth`` as the seed did: variant and labels from its name."""
    variant, labels = osteo.seed_checkpoint_spec(path.name)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state, notes = osteo.seed_state_dict(checkpoint, num_classes=len(labels))
    card = {
        "task": "osteo", "name": path.stem, "version": "seed-import", "demo": False,
        "architecture": osteo.default_architecture(variant, num_classes=len(labels)),
        "input": osteo.default_input_spec(), "labels": labels,
        "folds": [{"file": path.name, "sha256": cards.sha256_file(path)}],
        "data": {"source": "original seed checkpoint, imported at start-up", **notes},
    }
    cls = handler_class("osteo")
    bundle = build_bundle(card, card["folds"], [state], cls.builders, settings.device)
    handler = cls.from_bundle(bundle, settings, source=str(path))
    handler.warm_up()
    return handler


def load_registry(weights: Path, settings: Settings, tasks: list[str] | None = None,
                  task_devices: dict[str, torch.device] | None = None) -> Registry:
    """Load every card under ``weights`` (or a seed .pth), restricted to ``tasks`` when given.

    ``task_devices`` places tasks on other devices than ``settings.device`` (several GPUs).
    """
    registry = Registry()
    task_devices = task_devices or {}

    def settings_for(task: str | None) -> Settings:
        return replace(settings, device=task_devices[task]) if task in task_devices else settings

    wanted = set(tasks) if tasks else None
    if weights.is_file():
        try:
            registry.handlers["osteo"] = _load_seed_checkpoint(weights, settings_for("osteo"))
        except Exception as exc:  # a broken checkpoint must not stop the daemon from answering
            log.exception("cannot load seed checkpoint %s", weights)
            registry.unavailable["osteo"] = f"cannot load {weights.name}: {exc}"
        return registry
    folders = sorted({path.parent for path in weights.glob(f"*/{cards.CARD_FILE}")})
    if (weights / cards.CARD_FILE).is_file():
        folders.insert(0, weights)
    kind_folders = [folder for folder in folders if _card_task(folder, known=(kind.TASK,)) == kind.TASK]
    folders = [folder for folder in folders if folder not in kind_folders]
    _load_kind_gate(registry, kind_folders, weights, settings)
    for folder in folders:
        task_hint = folder.name if folder != weights else "?"
        claimed = _card_task(folder)
        if wanted is not None and claimed is not None and claimed not in wanted:
            continue  # not asked for with --tasks: do not spend start-up time loading it
        try:
            handler = _load_card_folder(folder, settings_for(claimed))
        except Exception as exc:
            task = claimed or task_hint
            if wanted is None or task in wanted:
                log.error("task %s unavailable: %s", task, exc)
                registry.unavailable[task] = f"{folder}: {exc}"
            continue
        if wanted is not None and handler.task not in wanted:
            continue
        if handler.task in registry.handlers:
            log.warning("two cards for task %s; keeping %s", handler.task, registry.handlers[handler.task].source)
            continue
        log.info("loaded %s (%s, fold networks %s) from %s", handler.task, handler.card["name"],
                 handler.bundle.folds_used(), folder)
        registry.handlers[handler.task] = handler
    for task in (wanted if wanted is not None else ()):
        if task not in registry.handlers and task not in registry.unavailable:
            registry.unavailable[task] = f"no card for {task!r} under {weights}"
    for handler in registry.handlers.values():
        handler.kind_gate = registry.kind_gate
    return registry


def _load_kind_gate(registry: Registry, folders: list[Path], weights: Path, settings: Settings) -> None:
    """The image-kind gate from the (first) kind card, unless ``--no-kind-check``; a broken kind card
    leaves the tasks ungated, saying why, and never takes a task down."""
    if not settings.check_kind:
        registry.kind_gate_off = "turned off with --no-kind-check"
        return
    if not folders:
        registry.kind_gate_off = f"no kind card under {weights} (e.g. weights/kind/card.json): images are not checked"
        log.warning("no image-kind card under %s: requests are served without the kind gate", weights)
        return
    try:
        registry.kind_gate = KindGate.load(folders[0])
    except Exception as exc:
        log.error("image-kind gate unavailable: %s", exc)
        registry.kind_gate_off = f"{folders[0]}: {exc}"
        return
    log.info("image-kind gate on (%s, %d fold(s), refuse at %.3f) from %s", registry.kind_gate.card["name"],
             len(registry.kind_gate.networks), registry.kind_gate.refuse_at, folders[0])


def _card_task(folder: Path, known: tuple[str, ...] = TASKS) -> str | None:
    """The task a (possibly broken) card claims, when it is one of ``known``, for reporting which task is unavailable."""
    try:
        import json
        value = json.loads((folder / cards.CARD_FILE).read_text(encoding="utf-8")).get("task")
        return value if value in known else None
    except Exception:
        return None
