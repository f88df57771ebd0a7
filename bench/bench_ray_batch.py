"""Offline batch throughput: one daemon subprocess vs Ray actors; results go to bench/RESULTS.md ("Ray batch").

    python bench/bench_ray_batch.py --weights weights/ [--n 16] [--size 1348 2863] [--ray ADDRESS]
                                    [--runs single ray:1x2 ray:2x1] [--gpus-per-actor 1]

N osteo requests (real-size panoramic phantoms, the demo card, Grad-CAM) go through the same
paths ``python -m daemon.batch`` takes: ``daemon_replies`` (one ``run_model.py``) and
``ray_batch.replies`` (``ray:AxC`` = A actors of C CPUs each, on a local Ray unless ``--ray``).
Reported per run: wall time from the start (Ray start, actor start, model loading included),
time to the first reply, and the steady throughput: replies after the first one (and those that
came with it, a batch) over the time from the first reply to the last.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_osteo import phantom  # noqa: E402
from bench.results import write_section  # noqa: E402
from daemon.batch import daemon_replies, requests_from  # noqa: E402


def timed(replies) -> tuple[list[float], int]:
    """Seconds at which each reply arrived (from the call), and how many failed."""
    began, stamps, failed = time.perf_counter(), [], 0
    for _, reply in replies:
        stamps.append(time.perf_counter() - began)
        failed += reply["result"] != "ok"
    return stamps, failed


def run(spec: str, args: argparse.Namespace, folder: Path, out: Path) -> dict:
    requests = requests_from(folder, "osteo", out / spec.replace(":", "-"))
    indexes = list(range(len(requests)))
    daemon_args = ["--tasks", "osteo", "--device", args.device]
    if spec == "single":
        return {"spec": spec, "timing": timed(daemon_replies(args.weights, daemon_args, requests, indexes))}
    from daemon import ray_batch

    actors, cpus = (float(x) for x in spec.removeprefix("ray:").split("x"))
    replies = ray_batch.replies(args.weights, daemon_args, requests, indexes, address=args.ray or "local",
                                actors=int(actors), cpus_per_actor=cpus, gpus_per_actor=args.gpus_per_actor,
                                batch_size=args.batch_size)
    return {"spec": spec, "timing": timed(replies)}


def describe(spec: str) -> str:
    if spec == "single":
        return "one daemon subprocess (`python -m daemon.batch`)"
    actors, cpus = spec.removeprefix("ray:").split("x")
    return f"Ray, {actors} actor(s) x {cpus} CPU (`--ray --actors {actors} --cpus-per-actor {cpus}`)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=REPO / "weights")
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--size", type=int, nargs=2, default=(1348, 2863), metavar=("H", "W"))
    parser.add_argument("--runs", nargs="+", default=["single", "ray:1x2", "ray:2x1"])
    parser.add_argument("--ray", default=None, help="address of a running cluster (default: a local Ray per run)")
    parser.add_argument("--device", default="cpu", help="daemon --device of every run (default cpu)")
    parser.add_argument("--gpus-per-actor", type=float, default=0.0)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    load = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "in"
        folder.mkdir()
        first = phantom(folder / "pano000.png", *args.size)
        for i in range(1, args.n):
            (folder / f"pano{i:03d}.png").write_bytes(first.read_bytes())
        for spec in args.runs:
            result = run(spec, args, folder, Path(tmp) / "out")
            stamps, failed = result["timing"]
            later = sum(stamp > stamps[0] + 1e-3 for stamp in stamps)  # replies after the first batch's
            steady = later / (stamps[-1] - stamps[0]) if later else float("nan")
            rows.append((spec, stamps[-1], stamps[0], steady, failed))
            print(f"{spec}: {stamps[-1]:.1f} s wall, first reply at {stamps[0]:.1f} s, "
                  f"{steady:.2f} requests/s steady, {failed} failed", flush=True)
    load_end = os.getloadavg()[0]
    baseline = next((steady for spec, _, _, steady, _ in rows if spec == "single"), None)
    table = ["| run | wall (all in) | first reply | steady throughput | vs one daemon |", "|---|---|---|---|---|"]
    for spec, wall, first_reply, steady, failed in rows:
        ratio = f"{steady / baseline:.2f}x" if baseline else ""
        table.append(f"| {describe(spec)} | {wall:.1f} s | {first_reply:.1f} s | {steady:.2f} req/s | {ratio} |"
                     + (f" ({failed} failed)" if failed else ""))
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    title = "Ray batch" if args.device == "cpu" else f"Ray batch ({args.device})"
    body = f"""
`python bench/bench_ray_batch.py --n {args.n} --size {args.size[0]} {args.size[1]} --batch-size {args.batch_size}`
(commit {git}): {args.n} osteo requests, {args.size[0]}x{args.size[1]} panoramic phantoms, the demo card
(2 folds, Grad-CAM), device {args.device}. Load average {load:.1f} at the start, {load_end:.1f} at the end
(the machine is shared: noisy). "Steady" counts the replies after the first one (and after those
that arrived with it) over the time from the first reply to the last, so model loading and Ray's
start are left out; "wall" has them in.

{chr(10).join(table)}

Every run here shares the same {os.cpu_count()} cores, so Ray can add only its start, a second copy of the
models and 1-thread actors; it is for clusters with more GPUs or hosts than one daemon can use.
"""
    print(body)
    write_section(title, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
