"""BrixIA's published label files, read for training: ``metadata_global_v2.csv`` (``;``-separated, six-digit
``BrixiaScore``), ``metadata_consensus_v1.csv`` (ModeA-F / MeanA-F) and where a row's image lies."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks import brixia


def parse_brixia_score(value: Any) -> list[int]:
    """BrixIA ``BrixiaScore`` -> six region scores A..F.

    The CSV stores the six digits ABCDEF; read as a number (as pandas or a spreadsheet will)
    the leading zeros are lost, so shorter strings are left-padded with zeros: ``12`` ->
    ``000012`` -> [0, 0, 0, 0, 1, 2].
    """
    if isinstance(value, bool) or value is None:
        raise ValueError(f"BrixiaScore must be six digits 0-3, not {value!r}")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"BrixiaScore must be six digits 0-3, not {value!r}")
        value = int(value)
    text = str(value).strip()
    if text.endswith(".0"):
        text = text[:-2]
    if not text.isdigit() or len(text) > len(brixia.REGIONS):
        raise ValueError(f"BrixiaScore must be six digits 0-3, not {value!r}")
    digits = [int(c) for c in text.zfill(len(brixia.REGIONS))]
    if max(digits) >= brixia.SCORE_LEVELS:
        raise ValueError(f"BrixiaScore {text.zfill(6)!r} has a region score above 3")
    return digits


def read_metadata(path: str | Path) -> list[dict[str, Any]]:
    """Rows of ``metadata_global_v2.csv`` (``;``-separated) with ``scores`` parsed and checked.

    Each row keeps the CSV's fields (strings) plus ``scores`` (six ints), ``global`` (int) and
    ``consensus`` (bool). A row whose ``BrixiaScoreGlobal`` disagrees with the sum of its
    region scores is an error: a mis-parsed score column would otherwise train silently.
    """
    import pandas as pd

    table = pd.read_csv(path, sep=";", dtype=str, keep_default_na=False)
    missing = {"Filename", "BrixiaScore"} - set(table.columns)
    if missing:
        raise ValueError(f"{path}: not a BrixIA metadata CSV (';'-separated); missing column(s) "
                         f"{', '.join(sorted(missing))}; found {', '.join(table.columns)}")
    rows = []
    for number, row in enumerate(table.to_dict("records"), start=2):
        try:
            scores = parse_brixia_score(row["BrixiaScore"])
        except ValueError as exc:
            raise ValueError(f"{path} line {number}: {exc}") from None
        total = sum(scores)
        stated = str(row.get("BrixiaScoreGlobal", "")).strip()
        if stated and int(float(stated)) != total:
            raise ValueError(f"{path} line {number}: BrixiaScoreGlobal {stated} is not the sum of "
                             f"BrixiaScore {''.join(map(str, scores))} ({total})")
        consensus = str(row.get("ConsensusTestset", "0")).strip().lower() in ("1", "true", "yes")
        rows.append({**row, "scores": scores, "global": total, "consensus": consensus})
    return rows


def read_consensus(path: str | Path) -> dict[str, dict[str, Any]]:
    """``metadata_consensus_v1.csv`` -> {Filename: {"mode": [6 ints], "mean": [6 floats]}}."""
    import pandas as pd

    table = pd.read_csv(path, sep=";", dtype=str, keep_default_na=False)
    needed = {"Filename"} | {f"Mode{r}" for r in brixia.REGIONS} | {f"Mean{r}" for r in brixia.REGIONS}
    missing = needed - set(table.columns)
    if missing:
        raise ValueError(f"{path}: not a BrixIA consensus CSV; missing {', '.join(sorted(missing))}")
    return {row["Filename"]: {"mode": [int(float(row[f"Mode{r}"])) for r in brixia.REGIONS],
                              "mean": [float(row[f"Mean{r}"]) for r in brixia.REGIONS]}
            for row in table.to_dict("records")}


def resolve_image(folder: str | Path, filename: str) -> Path | None:
    """The image file of a metadata ``Filename`` under ``folder``: as named (DICOM), else the same
    stem as PNG/JPEG (the seed converted the DICOMs to PNG), else None."""
    folder = Path(folder)
    named = folder / filename
    if named.is_file():
        return named
    stem = Path(filename).stem
    for suffix in (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm"):
        candidate = folder / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None
