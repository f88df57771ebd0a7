"""Offline batch runs through the daemon: ``python -m daemon.batch WEIGHTS INPUT --task T --out DIR``.

INPUT is a requests file (JSON lines, as the protocol) or a folder of images (searched
recursively). Every request goes through the real daemon (``daemon.client``), so results are
exactly what the service would answer. Writes ``DIR/summary.csv``: one row per request with
task, input, result, prediction, output paths and error.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any, Iterator

from daemon.client import DaemonClient
from daemon.protocol import TASKS

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".dicom", ".bmp"}
# The reply field that carries each task's headline prediction.
PREDICTION_FIELDS = ("diagnosis", "severity", "global_score", "areas_px")
SUMMARY_COLUMNS = ["task", "img_path", "result", "prediction", "label", "paths", "error_code", "error"]


def requests_from(source: Path, task: str, out: Path) -> list[dict[str, Any]]:
    """Requests for a JSON-lines file (task/destination filled in when absent) or an image folder."""
    if source.is_dir():
        images = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        return [{"task": task, "img_path": str(p.resolve()),
                 "destination_path": str((out / p.parent.relative_to(source)).resolve())} for p in images]
    requests = []
    for number, line in enumerate(source.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        request = json.loads(line)
        if "op" in request:
            continue
        request.setdefault("task", task)
        request.setdefault("destination_path", str(out.resolve()))
        request.setdefault("id", f"line-{number}")
        requests.append(request)
    return requests


def summary_row(request: dict[str, Any], reply: dict[str, Any]) -> dict[str, Any]:
    prediction = next((reply[key] for key in PREDICTION_FIELDS if key in reply), "")
    paths = {key: value for key, value in reply.items() if (key.endswith("_path") or key == "dicom_paths") and value}
    error = reply.get("error") or {}
    row = {"task": request.get("task", ""), "img_path": request.get("img_path", ""), "result": reply["result"],
            "prediction": json.dumps(prediction) if isinstance(prediction, dict) else prediction,
            "label": reply.get("label", ""), "paths": json.dumps(paths), "error_code": error.get("code", ""),
            "error": error.get("message", "")}
    return row


def run(client: DaemonClient, requests: list[dict[str, Any]], progress: bool = True) -> Iterator[dict[str, Any]]:
    from tqdm import tqdm

    replies = client.map(requests)
    for request, reply in tqdm(zip(requests, replies), total=len(requests), disable=not progress, file=sys.stderr):
        yield summary_row(request, reply)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m daemon.batch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("weights", type=Path, help="weights folder (as for run_model.py)")
    parser.add_argument("input", type=Path, help="requests .jsonl file, or a folder of images")
    parser.add_argument("--task", choices=TASKS, default="osteo", help="task of requests that name none (default osteo)")
    parser.add_argument("--out", type=Path, required=True, help="output folder for results and summary.csv")
    parser.add_argument("--summary", type=Path, default=None, help="CSV summary path (default OUT/summary.csv)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--dicom", action="store_true",
                        help="also write DICOM objects (run_model.py --dicom): every request that does not say "
                             "\"dicom\": false; their paths go into the summary's paths column")
    parser.epilog = "Options after '--' go to run_model.py, e.g. -- --device cuda --explain saliency"
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if not args.input.exists():
        parser.error(f"{args.input} does not exist")
    args.out.mkdir(parents=True, exist_ok=True)
    requests = requests_from(args.input, args.task, args.out)
    summary = args.summary or args.out / "summary.csv"
    failed = 0
    daemon_args = (["--dicom"] if args.dicom else []) + extra
    with DaemonClient(args.weights, *daemon_args) as client, open(summary, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=SUMMARY_COLUMNS)
        writer.writeheader()
        for row in run(client, requests, progress=not args.no_progress):
            writer.writerow(row)
            failed += row["result"] != "ok"
    print(f"{len(requests)} requests, {failed} failed; summary in {summary}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
