"""The one scar card (``OUT/card.json``) that holds the image, clinical and combined models side by side.

Each model is trained by its own run into ``OUT/<model>/`` (splits, logs, plots, out-of-fold
predictions); its best fold weights are then moved up to ``OUT/<model>_fold<k>.safetensors`` and
the card's entries for that model are replaced, leaving the other models' entries as they were.
Fold entries carry ``model`` and ``fold`` (the daemon's ``--fold`` picks by it) and, for models
that read clinical features, the fold's scaler. Seed checkpoints are merged in the same way.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any, Sequence

from tasks import scar
from tasks.cards import CARD_FILE, CardError, read_card, sha256_file, write_card
from train.core.metrics import json_safe

STANDARDISATION = ("each clinical/combined fold entry's scaler: x' = (x - mean) / scale per feature, in the "
                   "order of 'names', fitted on that fold's training rows")


def weight_name(model: str, fold: int) -> str:
    return f"{model}_fold{fold}.safetensors"


def restore_for_resume(out: Path, model: str) -> None:
    """Copy published fold weights back into the run folder, so ``--resume`` recognises finished folds."""
    run = out / model
    for path in out.glob(f"{model}_fold*.safetensors"):
        match = re.fullmatch(rf"{model}_fold(\d+)\.safetensors", path.name)
        target = run / f"fold{match.group(1)}.safetensors" if match else None
        if target is not None and not target.exists():
            run.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)


def _existing(out: Path) -> dict[str, Any]:
    if not (out / CARD_FILE).is_file():
        return {}
    try:
        card = read_card(out)
    except CardError as exc:
        raise SystemExit(f"{out / CARD_FILE} exists but is not a readable card ({exc}); move it away first") from exc
    if card.get("task") != scar.TASK:
        raise SystemExit(f"{out / CARD_FILE} is a {card.get('task')!r} card; train scar into its own folder")
    return card


def card_photo_size(out: Path) -> list[int] | None:
    """The photo size the card in ``out`` already serves, if any (so later runs match it by default)."""
    try:
        return list(_existing(Path(out)).get("input", {}).get("photo", {}).get("size") or []) or None
    except SystemExit:
        return None


def check_compatible(out: Path, model: str, input_spec: dict | None, names: Sequence[str] | None) -> None:
    """Fail before training when the new model could not join the card in ``out``."""
    _check_compatible(_existing(Path(out)), model, input_spec, names)


def _check_compatible(card: dict[str, Any], model: str, input_spec: dict | None, names: Sequence[str] | None) -> None:
    """The models of one card must read photos and features the same way (the daemon feeds them once)."""
    others = {entry["model"] for entry in card.get("folds", []) if entry.get("model") != model}
    inputs = card.get("input", {})
    if input_spec is not None and inputs.get("photo") and others & {"image", "combined"} and inputs["photo"] != input_spec:
        raise SystemExit(f"the card's other models read photos as {inputs['photo']['size']} with their own settings, "
                         f"this {model} model as {input_spec['size']}: use the same --input-size, or a fresh --out")
    known = inputs.get("clinical_features")
    if names is not None and known and others & {"clinical", "combined"} and list(known) != list(names):
        raise SystemExit(f"the card's other models read the clinical features {known}, this {model} model {list(names)}: "
                         "train on the same table columns, or into a fresh --out")


def merge_quality(old: dict[str, Any] | None, new: dict[str, Any] | None) -> dict[str, Any] | None:
    """The card's quality ranges after a run: the run's measures replace the same measures, the others stay
    (an image run brings photo ranges, a clinical run feature ranges)."""
    if not new:
        return old
    if not old:
        return new
    return {**old, **new, "ranges": {**old.get("ranges", {}), **new.get("ranges", {})},
            "source": new.get("source", old.get("source"))}


def merge_model(out: Path, model: str, entries: list[dict[str, Any]], *, architecture: dict[str, Any],
                input_spec: dict[str, Any] | None, feature_names: Sequence[str] | None,
                section: dict[str, Any], quality: dict[str, Any] | None = None) -> dict[str, Any]:
    """Replace ``model``'s entries and records in ``OUT/card.json`` (creating it) and write it; returns the card."""
    card = _existing(out)
    existing_quality = card.get("quality")
    _check_compatible(card, model, input_spec, feature_names)
    folds = [entry for entry in card.get("folds", []) if entry.get("model") != model] + entries
    present = {entry["model"] for entry in folds}
    models = {name: record for name, record in card.get("models", {}).items() if name in present and name != model}
    models[model] = section
    architectures = {name: record for name, record in card.get("architecture", {}).items() if name in present}
    architectures[model] = architecture
    inputs = dict(card.get("input", {}))
    if input_spec is not None:
        inputs["photo"] = input_spec
    if feature_names is not None:
        inputs["clinical_features"] = list(feature_names)
    if not present & {"image", "combined"}:
        inputs.pop("photo", None)
    if not present & {"clinical", "combined"}:
        inputs.pop("clinical_features", None)
    demo = all(record.get("demo", False) for record in models.values())
    order = {name: i for i, name in enumerate(scar.MODES)}
    card = {
        "task": scar.TASK,
        "name": f"scar-{'-'.join(sorted(present, key=order.get))}{'-demo' if demo else ''}",
        "version": max(str(record.get("version", "")) for record in models.values()),
        "demo": demo,
        "architecture": architectures,
        "input": inputs,
        "labels": list(scar.LABELS),
        "folds": sorted(folds, key=lambda e: (order[e["model"]], e["fold"])),
        "metrics": {name: record.get("metrics", {}).get("pooled") for name, record in models.items()},
        "models": models,
        "data": {name: record.get("data") for name, record in models.items()},
    }
    if "clinical_features" in inputs:
        card["clinical_features"] = {"names": inputs["clinical_features"], "standardisation": STANDARDISATION}
    merged = merge_quality(existing_quality, quality)
    if merged:
        card["quality"] = merged
    write_card(out, json_safe(card))
    for path in out.glob(f"{model}_fold*.safetensors"):  # weights of an older run with more folds
        if path.name not in {entry["file"] for entry in entries}:
            path.unlink()
    return card


def publish_run(out: Path, model: str, run_card: dict[str, Any], *, input_spec: dict[str, Any] | None,
                feature_names: Sequence[str] | None, scalers: dict[int, dict] | None) -> dict[str, Any]:
    """Move a finished run's fold weights up beside the card and merge its records into it."""
    run = out / model
    entries = []
    for fold in run_card["folds"]:
        target = out / weight_name(model, fold["fold"])
        os.replace(run / fold["file"], target)
        entry = {"file": target.name, "sha256": sha256_file(target), "model": model, "fold": fold["fold"],
                 **{key: fold[key] for key in ("n_train", "n_val", "best_epoch", "metrics")}}
        if scalers is not None:
            entry["scaler"] = scalers[fold["fold"]]
        entries.append(entry)
    (run / CARD_FILE).unlink(missing_ok=True)  # OUT/card.json is the one record of this run now
    section = {key: run_card.get(key) for key in ("version", "demo", "metrics", "training", "data")}
    section["run_folder"] = model
    return merge_model(out, model, entries, architecture=run_card["architecture"], input_spec=input_spec,
                       feature_names=feature_names, section=section, quality=run_card.get("quality"))
