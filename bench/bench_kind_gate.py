"""What the image-kind gate adds to a request on the CPU, run by hand.

    python bench/bench_kind_gate.py --weights weights/ [--runs 30]

1. The gate alone (``KindGate.verdict``: shrink, letterbox, every fold network, the decision) on
   decoded images of the sizes the tasks meet: a full-size panoramic, a 2048x2048 hand film, a
   chest film, a phone photo.
2. Through the real daemon: the example scar photo request with ``"check_kind": true`` and ``false``, one at a
   time, median ``elapsed_ms`` of each and their difference.
Results go to the "Image-kind gate" section of bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from bench.results import write_section  # noqa: E402

SIZES = {"panoramic 1348x2863 gray": (1348, 2863, False), "hand 2048x2048 gray": (2048, 2048, False),
         "chest 512x512 gray": (512, 512, False), "photo 3024x4032 RGB": (3024, 4032, True)}


def _median_ms(fn, runs: int) -> tuple[float, float, float]:
    """Median wall, fastest wall (the run that had a core to itself, on a busy machine) and median CPU
    (this thread's) milliseconds of ``fn()``."""
    walls, cpus = [], []
    for _ in range(runs):
        wall, cpu = time.perf_counter(), time.thread_time()
        fn()
        cpus.append((time.thread_time() - cpu) * 1000)
        walls.append((time.perf_counter() - wall) * 1000)
    return round(statistics.median(walls), 1), round(min(walls), 1), round(statistics.median(cpus), 1)


def gate_alone(weights: Path, runs: int) -> dict[str, tuple]:
    """Per image size: (wall, CPU) ms of the whole verdict and of its preprocessing alone."""
    from daemon.kind_gate import KindGate
    from tasks import kind
    from tasks.imaging import DecodedImage

    gate = KindGate.load(weights / "kind")
    rng = np.random.default_rng(0)
    timings = {}
    for name, (height, width, colour) in SIZES.items():
        shape = (height, width, 3) if colour else (height, width)
        image = DecodedImage(rng.integers(0, 256, size=shape, dtype=np.uint8))
        gate.verdict("osteo", image)
        timings[name] = (_median_ms(lambda: gate.verdict("osteo", image), runs),
                         _median_ms(lambda: kind.preprocess(image.pixels, gate.card["input"]), runs))
    return {"folds": len(gate.networks), **timings}


def through_daemon(weights: Path, runs: int) -> dict[str, float]:
    """Median elapsed_ms of the example scar photo request (the cheapest image request, so the gate's
    share shows) with and without the gate, interleaved."""
    out = Path(tempfile.mkdtemp(prefix="bench-kind-"))
    proc = subprocess.Popen([sys.executable, str(REPO / "run_model.py"), str(weights), "--device", "cpu",
                             "--tasks", "scar"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    json.loads(proc.stdout.readline())
    elapsed: dict[bool, list[float]] = {True: [], False: []}
    for k in range(2 * runs + 2):
        check = k % 2 == 0
        request = {"task": "scar", "id": k, "img_path": str(REPO / "examples" / "scar_neck.jpg"),
                   "destination_path": str(out), "check_kind": check}
        proc.stdin.write((json.dumps(request) + "\n").encode())
        proc.stdin.flush()
        reply = json.loads(proc.stdout.readline())
        assert reply["result"] == "ok", reply
        if k >= 2:
            elapsed[check].append(reply["elapsed_ms"])
    proc.stdin.close()
    proc.wait(60)
    on, off = statistics.median(elapsed[True]), statistics.median(elapsed[False])
    return {"with gate ms": round(on, 1), "without ms": round(off, 1), "difference ms": round(on - off, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, default=REPO / "weights")
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    load = os.getloadavg()[0]
    alone = gate_alone(args.weights, args.runs)
    daemon = through_daemon(args.weights, args.runs)
    lines = ["`python bench/bench_kind_gate.py` (median of the runs; load average "
             f"{load:.1f} on {os.cpu_count()} cores at the start: wall times stretch with the load, the CPU time "
             f"of the calling thread much less). The gate alone on decoded images ({alone.pop('folds')} fold "
             "networks fused, one intra-op thread), and its preprocessing (shrink, letterbox, normalise) alone:",
             "", "| image | gate ms: median wall / fastest wall / median CPU | of which preprocessing |", "|---|---|---|"]
    lines += [f"| {name} | {' / '.join(map(str, gate))} | {' / '.join(map(str, prep))} |"
              for name, (gate, prep) in alone.items()]
    lines += ["", "Through the daemon (the example scar photo request, one at a time, `check_kind` true and "
                  "false interleaved, median elapsed_ms): " + ", ".join(f"{k} {v}" for k, v in daemon.items()) + "."]
    print("\n".join(lines))
    write_section("Image-kind gate", "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
