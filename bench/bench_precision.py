"""Lone-request latency per task under each ``--precision``, first request vs warm (run by hand on a GPU).

    python bench/bench_precision.py --device cuda [--rounds 4] [--no-write]

Starts ``run_model.py weights/`` once per precision, sends every example request one at a time
(waiting for each reply) ``--rounds`` times, and reports each task's ``elapsed_ms`` in the
first round and the median of the later rounds. The first round carries one-off costs
(cuDNN algorithm choice for a new input shape, lazy CUDA module loading), the later ones are
what a long-lived daemon serves at.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.results import write_section  # noqa: E402
from daemon.client import DaemonClient  # noqa: E402

EXAMPLES = {"osteo": "requests.jsonl", "scar": "scar_requests.jsonl", "handbone": "handbone_requests.jsonl",
            "brixia": "brixia_requests.jsonl"}


def example_requests(out: Path) -> list[dict]:
    requests = []
    for task, name in EXAMPLES.items():
        for line in (REPO / "examples" / name).read_text().splitlines():
            request = json.loads(line) if line.strip() else None
            if not request or "op" in request:
                continue
            request = {**request, "task": request.get("task", task)}
            if "img_path" in request:
                request["img_path"] = str(REPO / request["img_path"])
            request["destination_path"] = str(out / task)
            request.pop("id", None)
            requests.append(request)
    return requests


def measure(weights: Path, device: str, precision: str, rounds: int, out: Path) -> dict[str, list[list[float]]]:
    """task -> per round, the elapsed_ms of its requests."""
    timings: dict[str, list[list[float]]] = {}
    with DaemonClient(weights, "--device", device, "--precision", precision, timeout=300) as client:
        for round_ in range(rounds):
            for request in example_requests(out):
                reply = client.request(request)
                if reply.get("result") != "ok":
                    raise SystemExit(f"{precision}: {request} -> {reply}")
                rows = timings.setdefault(reply["task"], [[] for _ in range(rounds)])
                rows[round_].append(reply["elapsed_ms"])
    return timings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=REPO / "weights")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md as it is")
    args = parser.parse_args(argv)
    lines = ["| task | precision | first request (ms) | warm median (ms) |", "|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as scratch:
        for precision in ("fp32", "fp16"):
            timings = measure(args.weights, args.device, precision, args.rounds, Path(scratch))
            for task, rounds in timings.items():
                warm = [t for round_ in rounds[1:] for t in round_]
                lines.append(f"| {task} | {precision} | {rounds[0][0]:.0f} | "
                             f"{statistics.median(warm) if warm else float('nan'):.0f} |")
    table = "\n".join(lines)
    print(table)
    command = f"python bench/bench_precision.py --device {args.device} --rounds {args.rounds}"
    if args.no_write:
        return 0
    write_section(f"Precision ({args.device})", f"`{command}`: one request at a time, the demo "
                  f"weights, each example request {args.rounds} times; `fp16` = float16 autocast on CUDA.\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
