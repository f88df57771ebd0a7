"""``--val-every N``: validate on epochs divisible by N and on the last one, select among those only."""
from __future__ import annotations

import argparse
import csv

import pytest
import torch
from torch.utils.data import Dataset

from tasks.cards import read_card
from train.core import loop as common
from train.handbone import trainer as train_handbone
from train import synthetic
from train.core.loop import TrainTask, add_training_arguments, run_kfold
from train.core.distributed import DistributedContext
from train.core.reporting import plot_fold_curves

N_ITEMS = 8


class _Points(Dataset):
    def __init__(self, indices: list[int]) -> None:
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(N_ITEMS, 2, generator=generator)
        self.y = (self.x[:, 0] > 0).float()
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        i = self.indices[k]
        return self.x[i], self.y[i], i


class _CountingPlateau(torch.optim.lr_scheduler.ReduceLROnPlateau):
    def __init__(self, optimizer, steps: list) -> None:
        super().__init__(optimizer)
        self.steps = steps

    def step(self, metrics, *args, **kwargs):
        self.steps.append(float(metrics))
        return super().step(metrics, *args, **kwargs)


class _CountingStep(torch.optim.lr_scheduler.StepLR):
    def __init__(self, optimizer, steps: list) -> None:
        self.steps = steps
        super().__init__(optimizer, step_size=1, gamma=0.5)

    def step(self, *args, **kwargs):
        if self.last_epoch >= 0:  # not the step of its own constructor
            self.steps.append(self.last_epoch)
        return super().step(*args, **kwargs)


def _toy_task(make_scheduler) -> TrainTask:
    def records(outputs, targets, indices):
        return [{"index": int(i), "p": float(torch.sigmoid(o).squeeze()), "y": float(t)}
                for o, t, i in zip(outputs, targets, indices)]

    def metrics(rows):
        return {"accuracy": sum((r["p"] > 0.5) == (r["y"] > 0.5) for r in rows) / max(len(rows), 1), "n": len(rows)}

    return TrainTask(
        name="toy", items=[f"item{i}" for i in range(N_ITEMS)], strata=[i % 2 for i in range(N_ITEMS)],
        dataset=lambda indices, train, fit_rows: _Points(indices),
        build_model=lambda: torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1)),
        loss=lambda outputs, targets: torch.nn.functional.binary_cross_entropy_with_logits(outputs.squeeze(1), targets),
        records=records, metrics=metrics, score_key="accuracy", make_scheduler=make_scheduler,
        card={"name": "toy", "architecture": {}, "input": {}, "labels": ["a"]})


def _args(out, *extra: str) -> argparse.Namespace:
    parser = add_training_arguments(argparse.ArgumentParser(), epochs=5, batch_size=4, lr=0.1, folds=2)
    return parser.parse_args(["--out", str(out), *extra])


def _log(path) -> list[dict[str, str]]:
    return list(csv.DictReader(open(path, encoding="utf-8")))


@pytest.mark.parametrize("plateau", [True, False])
def test_validation_bn_recalibration_and_schedulers_follow_the_cadence(tmp_path, monkeypatch, plateau):
    steps: list = []
    schedule = _CountingPlateau if plateau else _CountingStep
    task = _toy_task(lambda optimizer: schedule(optimizer, steps))
    recalibrated: list[int] = []
    real = common.recalibrate_batch_norm

    def counting(model, dataset, batch_size, workers, context, max_batches, seed=0):
        recalibrated.append(seed)  # the framework passes seed + epoch
        return real(model, dataset, batch_size, workers, context, max_batches, seed=seed)

    monkeypatch.setattr(common, "recalibrate_batch_norm", counting)
    out = tmp_path / "toy"
    card = run_kfold(task, _args(out, "--val-every", "2", "--precise-bn", "1", "--seed", "7"),
                     DistributedContext(), module="test")
    for fold in range(2):
        rows = _log(out / "logs" / f"fold{fold}.csv")
        assert [row["epoch"] for row in rows] == ["1", "2", "3", "4", "5"]
        assert all(row["train_loss"] for row in rows)
        assert [bool(row["val_loss"]) for row in rows] == [False, True, False, True, True]
        assert [bool(row["accuracy"]) for row in rows] == [False, True, False, True, True]
        assert card["folds"][fold]["best_epoch"] in (2, 4, 5)
        assert (out / "logs" / f"fold{fold}.png").is_file()
    assert recalibrated == [7 + epoch for epoch in (2, 4, 5)] * 2  # before validations only
    if plateau:
        assert len(steps) == 3 * 2  # on validated epochs, with their validation loss
    else:
        assert len(steps) == 5 * 2  # every epoch
    assert card["training"]["val_every"] == 2


def test_val_every_below_one_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="--val-every"):
        run_kfold(_toy_task(lambda optimizer: None), _args(tmp_path / "toy", "--val-every", "0"),
                  DistributedContext(), module="test")


def test_fold_curves_plot_rows_without_validation(tmp_path):
    rows = [{"epoch": 1, "lr": 0.1, "train_loss": 0.9, "val_loss": float("nan")},
            {"epoch": 2, "lr": 0.1, "train_loss": 0.8, "val_loss": 0.7, "dice": 0.5},
            {"epoch": 3, "lr": 0.1, "train_loss": 0.7, "val_loss": "", "dice": None},
            {"epoch": 4, "lr": 0.1, "train_loss": 0.6}]
    assert plot_fold_curves(rows, "dice", tmp_path / "curves.png", "fold 0").stat().st_size > 0


def test_handbone_validates_on_epochs_two_and_three_of_three(tmp_path):
    data = tmp_path / "hands"
    synthetic.generate("handbone", data, n=4, size=(64, 64), seed=3)
    out = tmp_path / "handbone"
    argv = [str(data), "--out", str(out), "--arch", "unet", "--encoder", "tu-mobilenetv3_small_050",
            "--encoder-depth", "3", "--decoder-channels", "16", "16", "8", "--size", "64", "--folds", "2",
            "--epochs", "3", "--val-every", "2", "--batch-size", "4", "--seed", "0"]
    assert train_handbone.main(argv) == 0
    rows = _log(out / "logs" / "fold0.csv")
    assert [row["epoch"] for row in rows] == ["1", "2", "3"]
    assert [bool(row["val_loss"]) for row in rows] == [False, True, True]
    assert [bool(row["dice"]) for row in rows] == [False, True, True]
    card = read_card(out)
    assert {fold["best_epoch"] for fold in card["folds"]} <= {2, 3}
    assert card["training"]["val_every"] == 2
