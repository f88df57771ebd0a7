"""Turn an original research checkpoint into our weights + card: ``python -m train.import_checkpoint osteo model.pth --out DIR``.

Osteo: the seed's ``model.pth`` is an efficientnet-pytorch state dict (bare, or under
``state_dict``/``model``, maybe with DataParallel's ``module.`` prefix) with the 1000-way ImageNet
head of which only logits 0 (C1) and 1 (C3) were trained; we keep those two rows, which leaves
the seed's argmax decision unchanged. The variant and labels come from the file name as the
seed's run_model.py read them (``efficientnet-b7_..._C1_C3.pth``; ``C2C3`` in the name selects
C1/C2C3) unless given. The checkpoint is loaded with ``weights_only=True`` (no arbitrary
unpickling) and must load strictly into the network the card describes. The daemon calls
``import_osteo_checkpoint`` to serve a seed ``model.pth`` on the fly.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

import torch

from tasks import osteo
from tasks.cards import sha256_file, write_card
from tasks.weights import save_state_dict
from train.core.metrics import json_safe


def import_osteo_checkpoint(path: str | os.PathLike, out_dir: str | os.PathLike, arch: str | None = None,
                            labels: Sequence[str] | None = None) -> Path:
    """Convert a seed osteo checkpoint into ``out_dir/fold0.safetensors`` + ``card.json``; returns ``out_dir``.

    Raises ValueError with a message saying what to change when the file is not an
    efficientnet-pytorch checkpoint or does not fit the variant.
    """
    path, out_dir = Path(path), Path(out_dir)
    if arch is None or labels is None:
        try:
            named_arch, named_labels = osteo.seed_checkpoint_spec(path.name)
        except ValueError:
            if arch is None:
                raise
            named_arch, named_labels = arch, list(osteo.LABELS_C1_C3)
        arch = arch or named_arch
        labels = list(labels) if labels is not None else named_labels
    labels = list(labels)
    if len(labels) != 2:
        raise ValueError(f"an osteo model has two labels (e.g. C1,C3), got {labels}")
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError ... for foreign files
        raise ValueError(f"{path} is not a PyTorch checkpoint that loads with weights_only=True: {exc}") from exc
    state, notes = osteo.seed_state_dict(checkpoint, num_classes=2)
    architecture = osteo.default_architecture(arch, num_classes=2)
    network = osteo.build_network(architecture)
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{path.name} does not fit {arch} (pass --arch with the variant it was trained as): "
                         f"{str(exc).splitlines()[0]}") from exc
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / "fold0.safetensors"
    save_state_dict(state, weights)
    source_sha = sha256_file(path)
    card = {
        "task": osteo.TASK,
        "name": f"osteo-{arch}-seed-import",
        "version": f"import-{source_sha[:12]}",
        "demo": False,
        "architecture": architecture,
        "input": osteo.default_input_spec(),
        "labels": labels,
        "folds": [{"file": weights.name, "sha256": sha256_file(weights), "fold": 0}],
        "source": {"file": path.name, "sha256": source_sha, **notes},
        "data": {"source": "original research checkpoint (Dias et al. 2025); training data not distributed"},
        "training": {"imported_by": "train.import_checkpoint", "torch": torch.__version__},
    }
    write_card(out_dir, json_safe(card))
    return out_dir


IMPORTERS = {"osteo": import_osteo_checkpoint}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.import_checkpoint",
                                     description="Convert an original research checkpoint into safetensors + card.json.")
    parser.add_argument("task", choices=sorted(IMPORTERS), help="which task the checkpoint belongs to")
    parser.add_argument("checkpoint", type=Path, help="the original checkpoint (e.g. the seed's model.pth)")
    parser.add_argument("--out", type=Path, required=True, help="folder for fold0.safetensors and card.json")
    parser.add_argument("--arch", default=None,
                        help="EfficientNet variant (efficientnet-b0 .. b7); default: parsed from the file name")
    parser.add_argument("--labels", default=None,
                        help="comma-separated label names, e.g. C1,C3; default C1,C3 (C1,C2C3 if the name has C2C3)")
    args = parser.parse_args(argv)
    labels = [label.strip() for label in args.labels.split(",")] if args.labels else None
    try:
        out = IMPORTERS[args.task](args.checkpoint, args.out, arch=args.arch, labels=labels)
    except (ValueError, FileNotFoundError) as exc:
        print(f"import failed: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out / 'fold0.safetensors'} and {out / 'card.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
