"""``python -m train.handbone --tune N``: optuna trials, each a k-fold run, summarised in trials.csv and best.json."""
from __future__ import annotations

import csv
import json
import shlex
import sys

import pytest

from tasks.cards import read_card
from train.handbone import trainer as train_handbone
from train import synthetic
from train.handbone.tune import strip_options

TINY = ["--arch", "unet", "--encoder", "tu-mobilenetv3_small_050", "--encoder-depth", "3",
        "--decoder-channels", "16", "16", "8", "--folds", "2", "--batch-size", "4", "--seed", "0"]
SEARCH = ["--tune", "2", "--tune-sizes", "64", "--tune-lr", "1e-3", "1e-2", "--tune-epochs", "1", "1"]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    data = tmp_path_factory.mktemp("hands")
    synthetic.generate("handbone", data, n=4, size=(64, 64), seed=3)
    return data


def test_two_trials_write_trials_csv_and_the_best_command(phantoms, tmp_path, capsys):
    pytest.importorskip("optuna")
    out = tmp_path / "handbone"
    assert train_handbone.main([str(phantoms), "--out", str(out), *TINY, *SEARCH]) == 0
    rows = list(csv.DictReader(open(out / "tune" / "trials.csv", encoding="utf-8")))
    assert [row["trial"] for row in rows] == ["0", "1"]
    assert all(row["state"] == "COMPLETE" and row["size"] == "64" and row["epochs"] == "1" for row in rows)
    assert all(1e-3 <= float(row["lr"]) <= 1e-2 and 0 <= float(row["dice"]) <= 1 for row in rows)
    best = json.loads((out / "tune" / "best.json").read_text())
    assert best["dice"] == pytest.approx(max(float(row["dice"]) for row in rows), rel=1e-5)
    assert best["params"]["size"] == 64 and best["params"]["epochs"] == 1 and best["n_complete"] == 2
    for k in (0, 1):
        card = read_card(out / "tune" / f"trial{k}")
        assert card["input"]["size"] == [64, 64] and card["training"]["epochs"] == 1
        # The trial's card records the trial's own command, not the search's.
        assert "--tune" not in card["training"]["command"] and f"trial{k}" in card["training"]["command"]
    assert card["metrics"]["pooled"]["dice"] == pytest.approx(float(rows[1]["dice"]), rel=1e-5)
    # The best command trains into OUT with the best params and no search flags.
    command = shlex.split(best["command"])
    assert command[:3] == ["python", "-m", "train.handbone"] and not any(t.startswith("--tune") for t in command)
    parsed = train_handbone.parse_args(command[3:])
    assert parsed.out == out and parsed.size == 64 and parsed.epochs == 1 and parsed.tune == 0
    assert parsed.lr == pytest.approx(best["params"]["lr"]) and parsed.encoder == "tu-mobilenetv3_small_050"
    assert "tune: best trial" in capsys.readouterr().err


def test_without_optuna_tune_says_how_to_install_it(phantoms, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna -> ImportError
    with pytest.raises(SystemExit, match=r'pip install -e "\.\[tune\]"'):
        train_handbone.main([str(phantoms), "--out", str(tmp_path / "out"), *TINY, *SEARCH])


def test_tune_is_refused_under_torchrun_and_with_bad_ranges(phantoms, tmp_path, monkeypatch):
    argv = [str(phantoms), "--out", str(tmp_path / "out"), *TINY]
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="torchrun"):
        train_handbone.main([*argv, *SEARCH])
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(SystemExit, match="--tune-sizes: model size 60 is not a multiple of 8"):
        train_handbone.main([*argv, "--tune", "1", "--tune-sizes", "64", "60"])
    with pytest.raises(SystemExit, match="--tune-lr"):
        train_handbone.main([*argv, "--tune", "1", "--tune-lr", "1e-2", "1e-3"])
    assert not (tmp_path / "out" / "tune").exists()


def test_strip_options_drops_flags_in_every_spelling():
    argv = ["DATA", "--tune", "3", "--size=512", "--tune-sizes", "256", "512", "--elastic", "--lr", "1e-3",
            "--tune-lr", "1e-4", "1e-2", "--loss", "1", "-1", "1", "--out", "O"]
    options = {"--tune": 1, "--tune-sizes": "+", "--tune-lr": 2, "--size": 1, "--lr": 1, "--out": 1}
    assert strip_options(argv, options) == ["DATA", "--elastic", "--loss", "1", "-1", "1"]
