"""Model cards: the one record (``weights/<task>/card.json``) that says how to build, feed and trust a model.

A card names the architecture and its arguments, the input size and normalisation, the labels,
the fold weight files with their sha256, metrics and the data it was trained on. Written by the
trainers and the checkpoint importer, read by the daemon's registry.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

CARD_FILE = "card.json"
CARD_SCHEMA = 1
REQUIRED_KEYS = ("task", "name", "version", "architecture", "input", "labels", "folds")


class CardError(ValueError):
    """A card is missing, malformed, or does not match its weight files."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so large weights do not fill memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def read_card(folder: str | os.PathLike) -> dict[str, Any]:
    """Load and check ``folder/card.json``; raises CardError with a message that says what is wrong."""
    path = Path(folder) / CARD_FILE
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CardError(f"no {CARD_FILE} in {folder}") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CardError(f"{path} is not readable JSON: {exc}") from exc
    if not isinstance(card, dict):
        raise CardError(f"{path} must hold a JSON object")
    missing = [key for key in REQUIRED_KEYS if key not in card]
    if missing:
        raise CardError(f"{path} lacks {', '.join(missing)}")
    folds = card["folds"]
    if not isinstance(folds, list) or not folds:
        raise CardError(f"{path}: 'folds' must list at least one weight file")
    for fold in folds:
        if not isinstance(fold, dict) or not {"file", "sha256"} <= fold.keys():
            raise CardError(f"{path}: every fold needs 'file' and 'sha256'")
        if Path(fold["file"]).name != fold["file"]:
            raise CardError(f"{path}: fold file {fold['file']!r} must be a plain name inside the card's folder")
    return card


def fold_paths(folder: str | os.PathLike, card: dict[str, Any]) -> list[Path]:
    """Absolute paths of a card's fold files, in card order."""
    return [Path(folder).resolve() / fold["file"] for fold in card["folds"]]


def verify_folds(folder: str | os.PathLike, card: dict[str, Any]) -> None:
    """Check every fold file exists and matches the sha256 the card records."""
    for fold, path in zip(card["folds"], fold_paths(folder, card)):
        if not path.is_file():
            raise CardError(f"weight file {path} named by the card is missing")
        actual = sha256_file(path)
        if actual != fold["sha256"]:
            raise CardError(
                f"weight file {path} has sha256 {actual[:12]}..., the card expects "
                f"{fold['sha256'][:12]}...: the file was changed or corrupted"
            )


def write_card(folder: str | os.PathLike, card: dict[str, Any]) -> Path:
    """Write ``card.json`` atomically (temp file + rename) with the schema version stamped in."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    card = {"schema": CARD_SCHEMA, **card}
    missing = [key for key in REQUIRED_KEYS if key not in card]
    if missing:
        raise CardError(f"card for {folder} lacks {', '.join(missing)}")
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".card-", suffix=".json.tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(card, handle, indent=2)
        handle.write("\n")
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; the daemon may run as another user
    os.replace(tmp, folder / CARD_FILE)
    return folder / CARD_FILE


def card_summary(card: dict[str, Any]) -> dict[str, Any]:
    """What ``op: models`` shows of a card: identity, inputs, labels, folds and headline metrics."""
    return {
        "task": card["task"],
        "name": card["name"],
        "version": card["version"],
        "demo": bool(card.get("demo", False)),
        "architecture": card["architecture"],
        "input": card["input"],
        "labels": card["labels"],
        "folds": card["folds"],
        "metrics": card.get("metrics", {}).get("pooled", card.get("metrics", {})),
        "data": card.get("data"),
    }
