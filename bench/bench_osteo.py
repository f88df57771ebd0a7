"""Osteo request cost, run by hand: latency split by stage, daemon start-up time and peak RSS.

    python bench/bench_osteo.py --weights weights/ [--image pano.png | --size H W] [--runs 5] [--compare DIR]

Stages of one request through the real handler (decode, rolling ball, resize, normalisation,
forward, probabilities + Grad-CAM / saliency, colours + PNG encoding of each output, the
writes), then a real ``run_model.py`` subprocess timed from start to its ready line and after a
few requests (VmHWM from /proc). ``--compare DIR`` times an older checkout's code (its own
handler and weights) in a subprocess of the same run and shows it beside. Results go to the
"Osteo request" section of bench/RESULTS.md.
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
# --tree DIR (used by --compare): time that checkout's code instead of this one's.
_TREE = Path(sys.argv[sys.argv.index("--tree") + 1]).resolve() if "--tree" in sys.argv else REPO
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(_TREE))

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
    """Median ms of each stage of one osteo request through the handler of the tree imported."""
    from daemon import rendering
    from daemon.handlers.base import Settings
    from daemon.outputs import encode_png
    from daemon.registry import load_registry
    from tasks import osteo

    try:  # the compiled rolling ball loads in the background: time it once it is there
        from tasks import rolling_ball_numba
        rolling_ball_numba.wait(120)
    except ImportError:
        pass
    settings = Settings(device=torch.device("cpu"))
    handler = load_registry(weights, settings, ["osteo"]).handlers["osteo"]
    spec = handler.card["input"]
    out = Path(tempfile.mkdtemp(prefix="bench-osteo-"))
    job = handler.validate({"img_path": str(image), "destination_path": str(out)})
    gray = handler.read_input(str(image))
    background_free = osteo.background_subtracted(gray)
    shown = osteo.resized_gray(background_free, tuple(spec["size"]))
    prepared = handler.preprocess(job)
    batch = osteo.to_tensor(shown, spec)[None]
    results = {
        "decode": median_ms(lambda: handler.read_input(str(image)), runs),
        "rolling ball": median_ms(lambda: osteo.background_subtracted(gray), runs),
        "resize to 449x954": median_ms(lambda: osteo.resized_gray(background_free, tuple(spec["size"])), runs),
        "gray -> normalised RGB tensor": median_ms(lambda: osteo.to_tensor(shown, spec), runs),
        "preprocess (all, in the worker)": median_ms(lambda: handler.preprocess(job), runs),
    }
    with torch.inference_mode():
        results["forward, all folds"] = median_ms(lambda: [net(batch) for net in handler.networks], runs)
    for method in ("gradcam", "saliency"):
        prepared.method = method
        results[f"infer: probabilities + {method}"] = median_ms(lambda: handler.infer([prepared]), runs)
    inferred = handler.infer([prepared])[0]
    results["heat map: colours + PNG encode"] = median_ms(lambda: encode_png(rendering.heat_rgba(inferred.heat)), runs)
    results["seed overlay: colours + PNG encode"] = median_ms(
        lambda: encode_png(rendering.seed_overlay(prepared.shown, inferred.heat)), runs)
    results["Grad-CAM overlay: colours + PNG encode"] = median_ms(
        lambda: encode_png(rendering.heat_overlay(prepared.shown, inferred.heat)), runs)
    results["postprocess (saliency; 2 PNGs written)"] = median_ms(lambda: handler.postprocess(job, prepared, inferred), runs)
    for method in ("gradcam", "saliency"):
        job.options["explain"] = method

        def whole_request() -> None:
            ready = handler.preprocess(job)
            handler.postprocess(job, ready, handler.infer([ready])[0])

        results[f"whole request ({method})"] = median_ms(whole_request, runs)
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
    parser.add_argument("--image", type=Path, help="a panoramic X-ray (default: a phantom of --size)")
    parser.add_argument("--size", type=int, nargs=2, default=(1348, 2863), metavar=("H", "W"))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--requests", type=int, default=5, help="requests sent to the daemon before reading peak RSS")
    parser.add_argument("--compare", type=Path, metavar="DIR",
                        help="an older checkout (with its weights/): its stages are timed in the same run, beside")
    parser.add_argument("--tree", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    image = args.image or phantom(Path(tempfile.mkdtemp()) / "pano.png", *args.size)
    if args.json:
        print(json.dumps(stage_latency(args.weights, image, args.runs)))
        return
    before = None
    if args.compare:
        command = [sys.executable, __file__, "--tree", str(args.compare), "--json", "--image", str(image),
                   "--runs", str(args.runs), "--weights", str(args.compare / "weights")]
        output = subprocess.run(command, check=True, capture_output=True, text=True, cwd=args.compare).stdout
        before = json.loads(output.strip().splitlines()[-1])
    stages = stage_latency(args.weights, image, args.runs)
    startup = daemon_startup(args.weights, image, args.requests)
    if before is None:
        rows = "\n".join(f"| {name} | {ms:,.0f} |" for name, ms in stages.items())
        header = "| stage | ms |\n|---|---|"
    else:
        rows = "\n".join(f"| {name} | {before[name]:,.0f} | {ms:,.0f} | {ms / before[name]:.2f}x |"
                         for name, ms in stages.items())
        header = "| stage | before (ms) | after (ms) | after / before |\n|---|---|---|---|"
    source = f"a given image ({image.name})" if args.image else f"a {args.size[0]}x{args.size[1]} phantom"
    compare = f" --compare {args.compare}" if args.compare else ""
    body = f"""`python bench/bench_osteo.py --weights {args.weights} --runs {args.runs}{compare}` on {source};
median of {args.runs} runs, in-process through the real handler, CPU, torch threads {torch.get_num_threads()},
load average at the end {os.getloadavg()[0]:.1f} (other work on the machine inflates every number).

{header}
{rows}

Daemon subprocess (`run_model.py {args.weights} --device cpu`): ready line after {startup['ready_s']:.1f} s,
RSS at ready {startup['rss_ready_mb']:.0f} MB, peak RSS (VmHWM) after {startup['requests']} requests {startup['peak_rss_mb']:.0f} MB.
"""
    print(body)
    print(f"written to {write_section('Osteo request', body)}")


if __name__ == "__main__":
    main()
