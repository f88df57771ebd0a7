"""Model bundles: a card's fold files -> its networks, built, loaded and grouped by model, on a device.

The one way a card becomes networks, for the daemon's handlers, the image-kind gate and the
trainers that reload a card: the sha256 of every file is checked against the card, ``--fold``
picks the entries of one fold (entries marked ``shared``, like brixia's segmenter and STN,
serve every fold and always load), and each network is built from its architecture record and
loaded strictly from safetensors. A card whose entries name a ``model`` (scar's image /
clinical / combined, brixia's seg / stn / orient / score) has one architecture record per
model; a card whose entries do not is a one-model card, keyed by its task.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

from tasks import cards
from tasks.weights import load_state_dict

# Builds an untrained network from its architecture record.
Builder = Callable[[dict[str, Any]], torch.nn.Module]


@dataclass
class Bundle:
    """A card and its loaded networks: ``networks[model]`` lists that model's networks in card order,
    ``entries[model]`` the card's fold records they were loaded from (scar's scalers live there)."""
    card: dict[str, Any]
    networks: dict[str, list[torch.nn.Module]] = field(default_factory=dict)
    entries: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    folder: Path | None = None

    def __getitem__(self, model: str) -> list[torch.nn.Module]:
        """The networks of ``model`` (empty when the card has none)."""
        return self.networks.get(model, [])

    @property
    def models(self) -> list[str]:
        return list(self.networks)

    def only(self) -> list[torch.nn.Module]:
        """The networks of a one-model card."""
        if len(self.networks) != 1:
            raise ValueError(f"the {self.card.get('task')} bundle holds {len(self.networks)} models "
                             f"({', '.join(self.networks)}), not one")
        return next(iter(self.networks.values()))

    def all_networks(self) -> Iterator[torch.nn.Module]:
        for networks in self.networks.values():
            yield from networks

    def folds_used(self) -> int | dict[str, int]:
        """How many fold networks serve: a number for a one-model card, else one per model
        (brixia: ``{"seg": 2, "stn": 2, "orient": 2, "score": 3}``): a segmenter is not a scoring fold."""
        counts = {model: len(networks) for model, networks in self.networks.items()}
        return counts if self.multi_model else sum(counts.values())

    @property
    def multi_model(self) -> bool:
        return any("model" in entry for entries in self.entries.values() for entry in entries)


def select_entries(card: dict[str, Any], fold: int | None) -> list[int]:
    """Indices of the card's fold entries to load: all (ensemble) or those of ``fold``.

    An entry's fold number is its ``fold`` field (a card with several models per fold, like
    scar's image/clinical/combined, has several entries per fold), else its position. Entries
    marked ``shared`` (brixia's segmenter and STN, trained in their own folds) serve every fold
    and are always loaded.
    """
    numbers = [entry.get("fold", index) for index, entry in enumerate(card["folds"])]
    if fold is None:
        return list(range(len(numbers)))
    shared = [index for index, entry in enumerate(card["folds"]) if entry.get("shared")]
    chosen = [index for index, number in enumerate(numbers) if number == fold and index not in shared]
    if not chosen:
        own = sorted({number for index, number in enumerate(numbers) if index not in shared})
        raise cards.CardError(f"--fold {fold} asked for, but the card has folds {own}")
    return sorted(shared + chosen)


def build_bundle(card: dict[str, Any], entries: list[dict[str, Any]], state_dicts: list[dict[str, torch.Tensor]],
                 builders: Builder | Mapping[str, Builder], device: torch.device | str,
                 required: tuple[str, ...] = (), folder: Path | None = None) -> Bundle:
    """Build the networks of ``entries`` (card records, aligned with ``state_dicts``), load their weights
    strictly and put them in eval mode on ``device``. ``builders``: one builder for a one-model card,
    else ``{model: builder}``, each fed ``card["architecture"][model]``. ``required``: models the card
    must have."""
    task = card.get("task")
    bundle = Bundle(card, folder=folder)
    for entry, state in zip(entries, state_dicts):
        if callable(builders):
            model, record, build = task, card["architecture"], builders
        else:
            model = entry.get("model")
            if model not in builders:
                raise cards.CardError(f"{task} fold entry {entry['file']} needs 'model': one of {', '.join(builders)}")
            record = (card.get("architecture") or {}).get(model)
            if not record:
                raise cards.CardError(f"the {task} card lists {entry['file']} as {model} but has no "
                                      f"architecture.{model}")
            build = builders[model]
        network = build(record)
        network.load_state_dict(state, strict=True)
        network.eval().to(device)
        bundle.networks.setdefault(model, []).append(network)
        bundle.entries.setdefault(model, []).append(entry)
    for model in required:
        if not bundle[model]:
            raise cards.CardError(f"the {task} card has no {model} model")
    return bundle


def load_bundle(folder: str | os.PathLike, builders: Builder | Mapping[str, Builder], device: torch.device | str,
                fold: int | None = None, task: str | None = None, required: tuple[str, ...] = ()) -> Bundle:
    """Read ``folder/card.json``, check every fold file's sha256, and build the networks of ``fold``
    (all folds when None). ``task``: the task the card must be for. Raises CardError saying what is wrong."""
    folder = Path(folder)
    card = cards.read_card(folder)
    if task is not None and card["task"] != task:
        raise cards.CardError(f"{folder} holds a {card['task']!r} card, not a {task!r} card")
    cards.verify_folds(folder, card)
    chosen = select_entries(card, fold)
    paths = cards.fold_paths(folder, card)
    return build_bundle(card, [card["folds"][i] for i in chosen], [load_state_dict(paths[i]) for i in chosen],
                        builders, device, required, folder)
