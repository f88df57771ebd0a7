"""``python -m train.scar import CHECKPOINT --out weights/scar``: a seed scar checkpoint into the scar card.

The seed saved ``{"epoch", "state_dict" (``module.``-prefixed), "best_prec1", "optimizer"}``;
it is loaded with ``weights_only=True`` (no arbitrary unpickling), renamed by
``train.scar.seed_format``, checked by loading strictly into the network the card will describe, and
stored as ``OUT/<model>_fold<k>.safetensors``. The seed never saved its clinical scaler or column
order: ``--table`` (its training table) rebuilds both as the seed did (other columns in table
order, then age, BMI, Delta_date standardised over the table); ``--features`` names the columns
in the model's order for inputs that need no scaling.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tasks import scar
from train.scar import seed_format
from tasks.cards import sha256_file
from tasks.weights import save_state_dict
from train.scar.card import merge_model, weight_name


def add_import_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="the seed's checkpoint (e.g. combined_best.pth.tar)")
    parser.add_argument("--out", type=Path, required=True, help="card folder to add the model to (e.g. weights/scar)")
    parser.add_argument("--fold", type=int, default=0, help="fold number to file the model under (default 0)")
    parser.add_argument("--table", type=Path, default=None,
                        help="the seed's training table (xlsx/csv): clinical column order and scaler as the seed built them")
    parser.add_argument("--features", default=None,
                        help="comma-separated clinical feature names in the model's input order (no scaling)")
    parser.add_argument("--input-size", type=int, nargs=2, default=list(scar.INPUT_SIZE), metavar=("H", "W"),
                        help="photo size the model was trained at (the seed: 224 224)")


def seed_clinical_inputs(table: Path | None, features: str | None, n_features: int) -> tuple[list[str], dict]:
    """(feature names in model order, scaler) for an imported clinical or combined model."""
    if table is not None:
        from train.scar.data import _read_frame

        frame = _read_frame(table)
        names = seed_format.seed_feature_order([str(c).strip() for c in frame.columns])
        frame.columns = [str(c).strip() for c in frame.columns]
        scaler = seed_format.seed_scaler(frame[names].to_numpy(dtype=np.float64), names)
    elif features:
        names = [name.strip() for name in features.split(",") if name.strip()]
        scaler = {"mean": [0.0] * len(names), "scale": [1.0] * len(names)}
    else:
        raise ValueError("a clinical or combined checkpoint needs --table (the seed's training table) or --features")
    if len(names) != n_features:
        raise ValueError(f"the checkpoint reads {n_features} clinical features, {len(names)} were named: {names}")
    return names, scaler


def import_seed_checkpoint(path: Path, out: Path, *, fold: int = 0, table: Path | None = None,
                           features: str | None = None, input_size=scar.INPUT_SIZE) -> dict[str, Any]:
    """Convert and merge one seed checkpoint; returns the card. ValueError says what to change."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError, EOFError ... for files that are not checkpoints
        raise ValueError(f"{path} is not a PyTorch checkpoint that loads with weights_only=True: {exc}") from exc
    state = seed_format.seed_state_dict(checkpoint)
    model = seed_format.model_kind(state)
    architecture = seed_format.architecture_of(state, model)
    try:
        scar.build_network(model, architecture).load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{path.name} does not load into a scar {model} model: {str(exc).splitlines()[0]}") from exc
    names, scaler = (None, None)
    if model != "image":
        n_features = (architecture["clinical"] if model == "combined" else architecture)["n_features"]
        names, scaler = seed_clinical_inputs(table, features, n_features)
    out.mkdir(parents=True, exist_ok=True)
    target = out / weight_name(model, fold)
    save_state_dict(state, target)
    source = {"file": path.name, "sha256": sha256_file(path)}
    for key in ("epoch", "best_prec1", "arch"):  # the seed's bookkeeping, kept as provenance
        value = checkpoint.get(key) if isinstance(checkpoint, dict) else None
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, (int, float, str)):
            source[key] = value
    entry = {"file": target.name, "sha256": sha256_file(target), "model": model, "fold": fold}
    if scaler is not None:
        entry["scaler"] = scaler
    section = {"version": f"import-{source['sha256'][:12]}", "demo": False, "source": source,
               "data": {"source": "original research checkpoint (Kim et al. 2023); training data not distributed",
                        "scaler": "refitted on --table as the seed did" if table else "none (inputs as given)"}}
    input_spec = scar.default_input_spec(input_size) if model != "clinical" else None
    existing = [e for e in _card_folds(out) if e.get("model") == model and e.get("fold") != fold]
    return merge_model(out, model, existing + [entry], architecture=architecture, input_spec=input_spec,
                       feature_names=names, section=section)


def _card_folds(out: Path) -> list[dict[str, Any]]:
    import json

    path = out / "card.json"
    return json.loads(path.read_text(encoding="utf-8")).get("folds", []) if path.is_file() else []


def run_import(args: argparse.Namespace) -> int:
    try:
        card = import_seed_checkpoint(args.checkpoint, args.out, fold=args.fold, table=args.table,
                                      features=args.features, input_size=args.input_size)
    except (ValueError, FileNotFoundError) as exc:
        print(f"import failed: {exc}", file=sys.stderr)
        return 2
    models = sorted({entry["model"] for entry in card["folds"]})
    print(f"imported {args.checkpoint.name} into {args.out / 'card.json'} (models: {', '.join(models)})", file=sys.stderr)
    return 0
