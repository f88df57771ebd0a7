"""The daemon under a stream, run by hand; results go to bench/RESULTS.md ("Daemon throughput").

    python bench/bench_daemon.py --weights weights/ [--n 20] [--reference] [--leak-requests 500]

(a) N requests piped at once through ``run_model.py`` against a seed-style loop (one request
    at a time: decode, rolling ball, forward, backward to the input, write two PNGs) with the
    same weights (fold 0) and images; reported as a ratio from one run. ``--reference`` makes
    the seed loop use opencv-rolling-ball as the seed did (~1-2 min per image here).
(c) start-up time and RSS with every card under WEIGHTS loaded;
(d) RSS after 10 requests and after ``--leak-requests`` requests (a leak shows as growth).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from bench.bench_osteo import _vm, phantom  # noqa: E402
from bench.results import write_section  # noqa: E402


def start_daemon(weights: Path, *args: str) -> tuple[subprocess.Popen, float]:
    began = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(REPO / "run_model.py"), str(weights), *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=REPO)
    json.loads(proc.stdout.readline())
    return proc, time.perf_counter() - began


def piped(proc: subprocess.Popen, requests: list[dict]) -> float:
    """Write all requests at once, read all replies; seconds from first write to last reply."""
    began = time.perf_counter()
    proc.stdin.write(b"".join(json.dumps(r).encode() + b"\n" for r in requests))
    proc.stdin.flush()
    for _ in requests:
        reply = json.loads(proc.stdout.readline())
        if reply["result"] != "ok":
            raise RuntimeError(reply)
    return time.perf_counter() - began


def seed_style_loop(weights: Path, images: list[Path], out: Path, reference: bool) -> float:
    """One request at a time, as the seed's run_model.py did it (but with our weights)."""
    import cv2
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from tasks import cards, osteo
    from tasks.weights import load_state_dict

    card = cards.read_card(weights / "osteo")
    network = osteo.build_network(card["architecture"]).eval()
    network.load_state_dict(load_state_dict(cards.fold_paths(weights / "osteo", card)[0]))
    spec = card["input"]
    if reference:
        from cv2_rolling_ball import subtract_background_rolling_ball

    began = time.perf_counter()
    for index, path in enumerate(images):
        gray = cv2.imread(str(path), 0)
        if reference:
            background_free, _ = subtract_background_rolling_ball(gray.copy(), 180, light_background=False,
                                                                  use_paraboloid=True, do_presmooth=True)
        else:
            background_free = osteo.background_subtracted(gray)
        shown = osteo.resized_gray(background_free, tuple(spec["size"]))
        x = osteo.to_tensor(shown, spec)[None].requires_grad_(True)
        logits = network(x)
        logits[0, int(logits.argmax())].backward()
        saliency = x.grad.abs().amax(dim=1)[0].numpy()
        saliency = (saliency - saliency.min()) / max(float(saliency.max() - saliency.min()), 1e-12)
        plt.imsave(out / f"seed_{index}_saliency.png", plt.cm.hot(saliency))
        overlay = np.repeat(shown[..., None] / 255.0, 3, axis=2)
        red = plt.cm.hot(saliency)[..., 0]
        overlay[..., 0] = np.clip(overlay[..., 0] + np.where(red < 0.3, 0, red) * 1.5, 0, 1)
        plt.imsave(out / f"seed_{index}_overlay.png", overlay)
        Image.open(out / f"seed_{index}_overlay.png").load()
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=REPO / "weights")
    parser.add_argument("--n", type=int, default=12, help="requests in the throughput comparison")
    parser.add_argument("--size", type=int, nargs=2, default=(1348, 2863), metavar=("H", "W"))
    parser.add_argument("--reference", action="store_true", help="seed loop with opencv-rolling-ball (slow)")
    parser.add_argument("--leak-requests", type=int, default=500)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-daemon-"))
    images = [phantom(work / f"pano{i}.png", *args.size) for i in range(min(args.n, 4))]
    images = [images[i % len(images)] for i in range(args.n)]
    requests = [{"id": i, "img_path": str(p), "destination_path": str(work / "daemon")} for i, p in enumerate(images)]

    seed_s = seed_style_loop(args.weights, images, work, args.reference)
    proc, _ = start_daemon(args.weights, "--device", "cpu", "--tasks", "osteo", "--fold", "0",
                           "--explain", "saliency")
    daemon_s = piped(proc, requests)
    proc.stdin.close()
    proc.wait()

    proc, ready_s = start_daemon(args.weights, "--device", "cpu")
    rss_ready, hwm_ready = _vm(proc.pid, "VmRSS"), _vm(proc.pid, "VmHWM")
    small = phantom(work / "small.png", 449, 954)
    leak = [{"id": i, "img_path": str(small), "destination_path": str(work / "leak")} for i in range(args.leak_requests)]
    piped(proc, leak[:10])
    rss_10 = _vm(proc.pid, "VmRSS")
    piped(proc, leak[10:])
    rss_n = _vm(proc.pid, "VmRSS")
    peak = _vm(proc.pid, "VmHWM")
    proc.stdin.close()
    proc.wait()

    loop = "opencv-rolling-ball (as the seed)" if args.reference else "our rolling ball"
    body = f"""Load average at the end: {os.getloadavg()[0]:.1f}.
`python bench/bench_daemon.py --n {args.n}{' --reference' if args.reference else ''} --leak-requests {args.leak_requests}`, CPU, {args.size[0]}x{args.size[1]} phantoms, osteo fold 0, saliency.

| run | {args.n} requests | per request |
|---|---|---|
| seed-style loop, {loop} | {seed_s:.1f} s | {seed_s / args.n * 1000:,.0f} ms |
| daemon, all piped at once | {daemon_s:.1f} s | {daemon_s / args.n * 1000:,.0f} ms |
| ratio (seed loop / daemon) | **{seed_s / daemon_s:.1f}x** | |

All cards under `{args.weights}` loaded: ready after {ready_s:.1f} s, RSS {rss_ready:.0f} MB (peak so far {hwm_ready:.0f} MB).
Memory over a stream of 449x954 requests: RSS {rss_10:.0f} MB after 10, {rss_n:.0f} MB after {args.leak_requests}; peak {peak:.0f} MB.
"""
    print(body)
    print(f"written to {write_section('Daemon throughput', body)}")


if __name__ == "__main__":
    main()
