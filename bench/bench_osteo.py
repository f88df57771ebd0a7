"""Osteo request cost, run by hand: latency split by stage, daemon start-up time and peak RSS.

    python bench/bench_osteo.py --weights weights/ [--image pano.png] [--runs 5]

Stages of one request through the real handler (decode, preprocess = rolling ball + resize +
normalise, forward, explain for both methods, write), then a real ``run_model.py`` subprocess
timed from start to its ready line and after a few requests (VmHWM from /proc). Results go
to the "Osteo request" section of bench/RESULTS.md.
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
import torch  # noqa: E402

from bench.results import write_section  # noqa: E402


def phantom(path: Path, height: int, width: int) -> Path:
    """A real-size panoramic phantom from the trainer's generator, or a simple one if absent."""
    from PIL import Image
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = 70 + 50 * np.sin(xx / width * np.pi) * (yy / height) + rng.normal(0, 8, (height, width))
    image += 90 * np.exp(-((yy - 0.35 * height - 0.4 * height * ((xx - width / 2) / (width / 2)) ** 2) ** 2) / 900)
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path)
    return path


def median_ms(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def stage_latency(weights: Path, image: Path, runs: int) -> dict[str, float]:
    from daemon.handlers.base import Settings
    from daemon.registry import load_registry
    from tasks import osteo

    settings = Settings(device=torch.device("cpu"))
    handler = load_registry(weights, settings, ["osteo"]).handlers["osteo"]
    out = Path(tempfile.mkdtemp(prefix="bench-osteo-"))
    job = handler.validate({"img_path": str(image), "destination_path": str(out)})
    gray = handler.read_input(str(image))
    prepared = handler.preprocess(job)
    batch = prepared.tensor[None]
    results = {
        "decode": median_ms(lambda: handler.read_input(str(image)), runs),
        "rolling ball": median_ms(lambda: osteo.background_subtracted(gray), runs),
        "preprocess (all)": median_ms(lambda: osteo.preprocess(gray, handler.card["input"]), runs),
    }
    with torch.inference_mode():
        results["forward (all folds)"] = median_ms(lambda: [net(batch) for net in handler.networks], runs)
    for method in ("gradcam", "saliency"):
        prepared.method = method
        results[f"infer + {method}"] = median_ms(lambda: handler.infer([prepared]), runs)
    inferred = handler.infer([prepared])[0]
    results["write PNGs"] = median_ms(lambda: handler.postprocess(job, prepared, inferred), runs)
    job.options["explain"] = "gradcam"

    def whole_request() -> None:
        ready = handler.preprocess(job)
        handler.postprocess(job, ready, handler.infer([ready])[0])

    results["whole request (gradcam)"] = median_ms(whole_request, runs)
    return results


def daemon_startup(weights: Path, image: Path, requests: int) -> dict[str, float]:
    out = Path(tempfile.mkdtemp(prefix="bench-osteo-daemon-"))
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(REPO / "run_model.py"), str(weights), "--device", "cpu"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=REPO)
    json.loads(proc.stdout.readline())
    ready_s = time.perf_counter() - start
    rss_ready = _vm(proc.pid, "VmRSS")
    for i in range(requests):
        proc.stdin.write(json.dumps({"id": i, "img_path": str(image), "destination_path": str(out)}).encode() + b"\n")
        proc.stdin.flush()
        json.loads(proc.stdout.readline())
    peak = _vm(proc.pid, "VmHWM")
    proc.stdin.close()
    proc.wait(60)
    return {"ready_s": ready_s, "rss_ready_mb": rss_ready, "peak_rss_mb": peak, "requests": requests}


def _vm(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=REPO / "weights")
    parser.add_argument("--image", type=Path, help="a panoramic X-ray (default: a 1348x2863 phantom)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--requests", type=int, default=5, help="requests sent to the daemon before reading peak RSS")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    image = args.image or phantom(Path(tempfile.mkdtemp()) / "pano.png", 1348, 2863)
    stages = stage_latency(args.weights, image, args.runs)
    startup = daemon_startup(args.weights, image, args.requests)
    rows = "\n".join(f"| {name} | {ms:,.0f} |" for name, ms in stages.items())
    body = f"""`python bench/bench_osteo.py --weights {args.weights} --runs {args.runs}` on a {'given image' if args.image else '1348x2863 phantom'};
median of {args.runs} runs, in-process through the real handler, CPU, torch threads {torch.get_num_threads()},
load average at the end {os.getloadavg()[0]:.1f} (other work on the machine inflates every number).

| stage | ms |
|---|---|
{rows}

Daemon subprocess (`run_model.py {args.weights} --device cpu`): ready line after {startup['ready_s']:.1f} s,
RSS at ready {startup['rss_ready_mb']:.0f} MB, peak RSS (VmHWM) after {startup['requests']} requests {startup['peak_rss_mb']:.0f} MB.
"""
    print(body)
    print(f"written to {write_section('Osteo request', body)}")


if __name__ == "__main__":
    main()
