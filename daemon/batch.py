"""Offline batch runs through the daemon: ``python -m daemon.batch WEIGHTS INPUT --task T --out DIR [--ray]``.

INPUT is a requests file (JSON lines, as the protocol) or a folder of images (searched
recursively). Every request goes through the real daemon: one ``run_model.py`` subprocess
(``daemon.client``), or with ``--ray`` a pool of Ray actors each serving as that daemon does
(``daemon.ray_batch``), so results are exactly what the service would answer. Writes
``DIR/summary.csv``: one row per request with task, id, input, result, prediction, output paths
and error. Rows are written as replies arrive; a rerun of the same command skips the requests
whose row says ok (resume) and redoes the others.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
import tempfile
from collections import defaultdict, deque
from pathlib import Path
from typing import Any, Iterator

from daemon.client import DaemonClient, DaemonError
from daemon.protocol import TASKS
from tasks.imaging import is_image_file

# The reply field that carries each task's headline prediction.
PREDICTION_FIELDS = ("diagnosis", "severity", "global_score", "areas_px")
SUMMARY_COLUMNS = ["task", "id", "img_path", "result", "prediction", "label", "paths", "error_code", "error"]
# A row names its request by these columns (a folder's requests have no id; a requests file's do).
KEY_COLUMNS = ("task", "id", "img_path")


def requests_from(source: Path, task: str, out: Path) -> list[dict[str, Any]]:
    """Requests for a JSON-lines file (task/destination filled in when absent) or an image folder."""
    if source.is_dir():
        images = sorted(p for p in source.rglob("*") if is_image_file(p))
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
    row = {"task": request.get("task", ""), "id": request.get("id", ""), "img_path": request.get("img_path", ""),
           "result": reply["result"], "prediction": json.dumps(prediction) if isinstance(prediction, dict) else prediction,
           "label": reply.get("label", ""), "paths": json.dumps(paths), "error_code": error.get("code", ""),
           "error": error.get("message", "")}
    return row


def _cell(value: Any) -> str:
    """A value as the csv module writes it, so a request's key compares with a row read back."""
    return "" if value is None else str(value)


def request_key(request: dict[str, Any]) -> tuple[str, ...]:
    return tuple(_cell(request.get(column)) for column in KEY_COLUMNS)


def _row_key(row: dict[str, str]) -> tuple[str, ...]:
    return tuple(row.get(column) or "" for column in KEY_COLUMNS)


class Summary:
    """``summary.csv``, one row per request; a result in it is never lost.

    Rows are appended and flushed as replies arrive, so an interrupted run keeps what it finished.
    On a rerun, a request whose earlier row says ok is not sent again (``todo`` lists the others).
    On close the file is rewritten, atomically, with one row per request in request order (what a
    run in one go writes), followed by earlier rows that match none of this run's requests.
    """

    def __init__(self, path: Path, requests: list[dict[str, Any]]) -> None:
        self.path = path
        self.requests = requests
        previous = self._read()
        ok_rows: dict[tuple[str, ...], deque] = defaultdict(deque)
        for row in previous:
            if row.get("result") == "ok":
                ok_rows[_row_key(row)].append(row)
        self.rows: list[dict[str, Any] | None] = []
        for request in requests:
            done = ok_rows.get(request_key(request))
            self.rows.append(done.popleft() if done else None)
        wanted = {request_key(request) for request in requests}
        self.others = [row for row in previous if _row_key(row) not in wanted]
        self.todo = [index for index, row in enumerate(self.rows) if row is None]
        self.resumed = len(requests) - len(self.todo)
        if previous:
            self._rewrite()
        new = not path.exists()
        self._handle = open(path, "a", newline="", encoding="utf-8")
        self._writer = csv.DictWriter(self._handle, fieldnames=SUMMARY_COLUMNS)
        if new:
            self._writer.writeheader()

    def _read(self) -> list[dict[str, str]]:
        if not self.path.is_file():
            return []
        with open(self.path, newline="", encoding="utf-8") as handle:
            return [{column: row.get(column) or "" for column in SUMMARY_COLUMNS} for row in csv.DictReader(handle)]

    def _rewrite(self) -> None:
        """Replace the file by this run's rows in request order (those there are), then the others."""
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "w", newline="", encoding="utf-8") as handle:
                writer = csv.DictWriter(handle, fieldnames=SUMMARY_COLUMNS)
                writer.writeheader()
                writer.writerows([row for row in self.rows if row is not None] + self.others)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def add(self, index: int, reply: dict[str, Any]) -> dict[str, Any]:
        """Record the reply to ``requests[index]`` (appended to the file at once)."""
        row = summary_row(self.requests[index], reply)
        self.rows[index] = row
        self._writer.writerow(row)
        self._handle.flush()
        return row

    @property
    def failed(self) -> int:
        return sum(row is not None and row["result"] != "ok" for row in self.rows)

    def close(self) -> None:
        self._handle.close()
        self._rewrite()

    def __enter__(self) -> "Summary":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def daemon_replies(weights: Path, daemon_args: list[str], requests: list[dict[str, Any]],
                   indexes: list[int]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(index, reply) for ``requests[index]`` of every index, in order, from one daemon subprocess."""
    with DaemonClient(weights, *daemon_args) as client:
        yield from zip(indexes, client.map(requests[index] for index in indexes))


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """The batch's options, and the daemon's (those after ``--``)."""
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
    ray = parser.add_argument_group("on a Ray cluster (pip install -e '.[ray]')")
    ray.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                     help="serve the requests on Ray actors: ADDRESS of a running cluster (host:6379, 'auto' "
                          "for the one this machine joined), or a new local Ray when absent")
    ray.add_argument("--actors", type=int, default=None,
                     help="actors, each loading the models once (default: one per GPU of the cluster, else 1)")
    ray.add_argument("--gpus-per-actor", type=float, default=None,
                     help="GPUs each actor holds, fractions allowed (default: 1 when the cluster has GPUs, else 0; "
                          "an actor without a GPU serves on CPU)")
    ray.add_argument("--cpus-per-actor", type=float, default=None,
                     help="CPUs each actor holds; its torch threads follow (default: 1)")
    ray.add_argument("--batch-size", type=int, default=None,
                     help="requests handed to an actor at a time; its daemon batches inference within them by "
                          "its own --max-batch (default: 16)")
    parser.epilog = "Options after '--' go to run_model.py, e.g. -- --device cuda --explain saliency"
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if not args.input.exists():
        parser.error(f"{args.input} does not exist")
    ray_flags = {"--actors": args.actors, "--gpus-per-actor": args.gpus_per_actor,
                 "--cpus-per-actor": args.cpus_per_actor, "--batch-size": args.batch_size}
    if args.ray is None and any(value is not None for value in ray_flags.values()):
        parser.error(f"{', '.join(flag for flag, value in ray_flags.items() if value is not None)} only apply with --ray")
    for flag, value in ray_flags.items():
        if value is not None and (value < 0 if flag == "--gpus-per-actor" else value <= 0):
            parser.error(f"{flag} must be {'at least 0' if flag == '--gpus-per-actor' else 'positive'}")
    return args, extra


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    requests = requests_from(args.input, args.task, args.out)
    summary_path = args.summary or args.out / "summary.csv"
    extra = (["--dicom"] if args.dicom else []) + extra
    from tqdm import tqdm

    with Summary(summary_path, requests) as summary:
        if summary.resumed:
            print(f"resuming: {summary.resumed} of {len(requests)} requests already ok in {summary_path}",
                  file=sys.stderr)
        start_errors: tuple[type[Exception], ...] = (DaemonError,)
        if not summary.todo:
            replies: Iterator[tuple[int, dict[str, Any]]] = iter(())
        elif args.ray is None:
            replies = daemon_replies(args.weights, extra, requests, summary.todo)
        else:
            try:
                from daemon import ray_batch
            except ModuleNotFoundError as exc:
                if exc.name != "ray":
                    raise
                print("error: --ray needs Ray: pip install -e \".[ray]\"", file=sys.stderr)
                return 2
            start_errors += (ray_batch.ActorStartError,)
            replies = ray_batch.replies(args.weights, extra, requests, summary.todo, address=args.ray,
                                        actors=args.actors, gpus_per_actor=args.gpus_per_actor,
                                        cpus_per_actor=args.cpus_per_actor or 1.0, batch_size=args.batch_size or 16)
        try:
            for index, reply in tqdm(replies, total=len(summary.todo), disable=args.no_progress, file=sys.stderr):
                summary.add(index, reply)
        except start_errors as exc:  # the daemon or the actors could not start, or the daemon died
            print(f"error: {exc}", file=sys.stderr)
            return 2
    print(f"{len(requests)} requests, {summary.failed} failed; summary in {summary_path}", file=sys.stderr)
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
