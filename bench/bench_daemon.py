"""The daemon under a stream, run by hand; results go to bench/RESULTS.md ("Daemon throughput").

    python bench/bench_daemon.py --weights weights/ [--n 20] [--reference] [--leak-requests 500] [--device cuda]
    python bench/bench_daemon.py --rss-curve 2000 --rss-every 100 [--size 225 477] [--daemon-env MALLOC_ARENA_MAX=2]

(a) N requests piped at once through ``run_model.py`` against a seed-style loop (one request
    at a time: decode, rolling ball, forward, backward to the input, write two PNGs) with the
    same weights (fold 0) and images; reported as a ratio from one run. ``--reference`` makes
    the seed loop use opencv-rolling-ball as the seed did (~1-2 min per image here).
(c) start-up time and RSS with every card under WEIGHTS loaded;
(d) RSS after 10 requests and after ``--leak-requests`` requests (a leak shows as growth).

``--rss-curve N`` runs only a longer version of (d): N osteo requests (Grad-CAM, small
phantom) sent ``--rss-every`` at a time, RSS sampled after each chunk, written as the section
"Daemon RSS curve": a leak keeps climbing, allocator and cache warm-up flattens out.
``--device cuda`` runs the daemon (and the seed-style loop) there; sections from a device other
than the CPU get the device in their title, so they never replace the CPU numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from bench.bench_osteo import _vm, phantom  # noqa: E402
from bench import results  # noqa: E402
from bench.results import write_section  # noqa: E402


def start_daemon(weights: Path, *args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, float]:
    began = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(REPO / "run_model.py"), str(weights), *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=REPO,
                            env={**os.environ, **(env or {})})
    ready = json.loads(proc.stdout.readline())
    unavailable = {task: status["reason"] for task, status in ready["tasks"].items() if not status["available"]}
    if unavailable:
        raise RuntimeError(f"tasks unavailable: {unavailable}")
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


def seed_style_loop(weights: Path, images: list[Path], out: Path, reference: bool, device: str = "cpu") -> float:
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
    network.to(device)
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
        x = osteo.to_tensor(shown, spec)[None].to(device).requires_grad_(True)
        logits = network(x)
        logits[0, int(logits.argmax())].backward()
        saliency = x.grad.abs().amax(dim=1)[0].cpu().numpy()
        saliency = (saliency - saliency.min()) / max(float(saliency.max() - saliency.min()), 1e-12)
        plt.imsave(out / f"seed_{index}_saliency.png", plt.cm.hot(saliency))
        overlay = np.repeat(shown[..., None] / 255.0, 3, axis=2)
        red = plt.cm.hot(saliency)[..., 0]
        overlay[..., 0] = np.clip(overlay[..., 0] + np.where(red < 0.3, 0, red) * 1.5, 0, 1)
        plt.imsave(out / f"seed_{index}_overlay.png", overlay)
        Image.open(out / f"seed_{index}_overlay.png").load()
    return time.perf_counter() - began


def rss_curve(args: argparse.Namespace, work: Path) -> str:
    """RSS of a daemon with every card loaded over ``args.rss_curve`` small osteo requests."""
    env = dict(item.split("=", 1) for item in args.daemon_env)
    proc, ready_s = start_daemon(args.weights, "--device", args.device, env=env)
    small = phantom(work / "small.png", *args.size)
    sample = lambda: tuple(_vm(proc.pid, field) for field in ("VmRSS", "VmHWM", "RssAnon", "RssFile"))  # noqa: E731
    samples = [(0, *sample(), 0.0)]
    began = time.perf_counter()
    sent = 0
    while sent < args.rss_curve:
        count = min(args.rss_every, args.rss_curve - sent)
        chunk = [{"id": sent + i, "img_path": str(small), "destination_path": str(work / "curve" / str(sent // 1000))}
                 for i in range(count)]
        seconds = piped(proc, chunk)
        sent += count
        samples.append((sent, *sample(), seconds / count * 1000))
        print(f"{sent:6d} requests: RSS {samples[-1][1]:7.1f} MB (anon {samples[-1][3]:7.1f}, file "
              f"{samples[-1][4]:6.1f}), peak {samples[-1][2]:7.1f} MB, {samples[-1][5]:6.0f} ms/request", flush=True)
        if sent % 1000 == 0:
            shutil.rmtree(work / "curve" / str(sent // 1000 - 1), ignore_errors=True)
    time.sleep(args.rss_idle)  # the daemon trims its heap after 2 s without requests
    idle = sample()
    proc.stdin.close()
    proc.wait()
    total_s = time.perf_counter() - began
    rows = "\n".join(f"| {n or '0 (ready)'} | {rss:.0f} | {f'{rss - samples[1][1]:+.0f}' if n else ''} | {anon:.0f} | "
                     f"{file:.0f} | {peak:.0f} | {f'{ms:.0f}' if n else ''} |" for n, rss, peak, anon, file, ms in samples)
    half = [sample[1] for sample in samples if sample[0] >= args.rss_curve // 2]
    env_text = " ".join(f"`{item}`" for item in args.daemon_env) or "none"
    command = (f"`nice -n 10 python bench/bench_daemon.py --rss-curve {args.rss_curve} --rss-every {args.rss_every} "
               f"--size {args.size[0]} {args.size[1]}" + "".join(f" --daemon-env {e}" for e in args.daemon_env)
               + (f" --device {args.device}" if args.device != "cpu" else "") + "`")
    return f"""{args.gpu}{command}: every card under `{args.weights}` loaded (ready after {ready_s:.1f} s), then
{args.rss_curve} osteo requests (Grad-CAM, {args.size[0]}x{args.size[1]} phantom, one destination
folder per thousand), piped {args.rss_every} at a time; RSS read from /proc after each chunk.
Daemon environment: {env_text}. {total_s / 60:.1f} min in all; load average at the end {os.getloadavg()[0]:.1f}.

| requests | RSS MB | vs after {samples[1][0]} | anonymous MB | file-backed MB | peak MB | ms/request |
|---|---|---|---|---|---|---|
{rows}

Second half (requests {args.rss_curve // 2}-{args.rss_curve}): RSS {min(half):.0f}-{max(half):.0f} MB, spread {max(half) - min(half):.0f} MB.
After {args.rss_idle:g} s without requests: RSS {idle[0]:.0f} MB (anonymous {idle[2]:.0f} MB).
"""


def burst_case(args: argparse.Namespace, work: Path) -> str:
    """Cold start and a burst of ``args.burst`` piped full-size osteo requests, every card loaded."""
    from bench.bench_fastpath import Daemon, burst

    images = [phantom(work / f"pano{i}.png", *args.size) for i in range(2)]
    daemon = Daemon(REPO, args.weights, "--device", args.device)
    began = time.perf_counter()
    reply, _ = daemon.ask({"img_path": str(images[0]), "destination_path": str(work / "first")})
    first_ms = (time.perf_counter() - began) * 1000
    measured = burst(daemon, images, args.burst, work)
    daemon.close()
    return f"""{args.gpu}`python bench/bench_daemon.py --burst {args.burst}`, {args.device}, every card under `{args.weights}`
loaded, {args.size[0]}x{args.size[1]} osteo phantoms; load average at the end {os.getloadavg()[0]:.1f}.

| | |
|---|---|
| ready line after start | {daemon.ready_s:.1f} s |
| first osteo request after the ready line (wall; its elapsed_ms {reply['elapsed_ms']:.0f}) | {first_ms:.0f} ms |
| RSS idle before the burst | {measured['idle']:.0f} MB |
| RSS peak during {args.burst} piped requests | {measured['peak']:.0f} MB ({measured['peak'] / measured['idle']:.2f}x idle) |
| RSS right after the last reply | {measured['after']:.0f} MB |
| RSS 5 s after | {measured['after_idle']:.0f} MB ({(measured['after_idle'] / measured['idle'] - 1) * 100:+.1f} % of idle) |
| burst wall time | {measured['seconds']:.0f} s |
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=REPO / "weights")
    parser.add_argument("--n", type=int, default=12, help="requests in the throughput comparison")
    parser.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="phantom size (default: 1348 2863; 449 954 for --rss-curve)")
    parser.add_argument("--reference", action="store_true", help="seed loop with opencv-rolling-ball (slow)")
    parser.add_argument("--leak-requests", type=int, default=500)
    parser.add_argument("--device", default="cpu", help="device of the daemon and the seed-style loop (default: cpu)")
    parser.add_argument("--rss-curve", type=int, default=0, metavar="N",
                        help="only measure RSS over N osteo requests (section 'Daemon RSS curve')")
    parser.add_argument("--rss-every", type=int, default=100, metavar="K", help="RSS sample every K requests")
    parser.add_argument("--rss-idle", type=float, default=5.0, metavar="S",
                        help="after the curve, RSS once more after S seconds without requests (default: 5)")
    parser.add_argument("--daemon-env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment variable for the daemon of --rss-curve (e.g. MALLOC_ARENA_MAX=2)")
    parser.add_argument("--burst", type=int, default=0, metavar="N",
                        help="only the cold start (ready line, first full-size request) and a burst of N piped "
                             "full-size osteo requests with every card loaded: RSS idle, peak, right after, after "
                             "idle (section 'Daemon burst')")
    parser.add_argument("--results", type=Path, default=results.RESULTS,
                        help="markdown file whose section is replaced (default: bench/RESULTS.md)")
    args = parser.parse_args()
    results.RESULTS = args.results
    suffix = "" if args.device == "cpu" else f" ({args.device})"
    args.gpu = ""
    if args.device.startswith("cuda"):
        import torch
        args.gpu = f"GPU: {torch.cuda.get_device_name(torch.device(args.device))}, torch {torch.__version__}.\n"
        print(args.gpu, flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench-daemon-"))
    if args.rss_curve:
        args.size = args.size or (449, 954)
        body = rss_curve(args, work)
        print(body)
        title = "Daemon RSS curve" + suffix + "".join(f", {e}" for e in args.daemon_env)
        print(f"written to {write_section(title, body)}")
        shutil.rmtree(work, ignore_errors=True)
        return
    if args.burst:
        args.size = args.size or (1348, 2863)
        body = burst_case(args, work)
        print(body)
        print(f"written to {write_section('Daemon burst' + suffix, body)}")
        shutil.rmtree(work, ignore_errors=True)
        return
    args.size = args.size or (1348, 2863)
    images = [phantom(work / f"pano{i}.png", *args.size) for i in range(min(args.n, 4))]
    images = [images[i % len(images)] for i in range(args.n)]
    requests = [{"id": i, "img_path": str(p), "destination_path": str(work / "daemon")} for i, p in enumerate(images)]

    seed_s = seed_style_loop(args.weights, images, work, args.reference, args.device)
    proc, _ = start_daemon(args.weights, "--device", args.device, "--tasks", "osteo", "--fold", "0",
                           "--explain", "saliency")
    daemon_s = piped(proc, requests)
    proc.stdin.close()
    proc.wait()

    proc, ready_s = start_daemon(args.weights, "--device", args.device)
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
    body = f"""{args.gpu}Load average at the end: {os.getloadavg()[0]:.1f}.
`python bench/bench_daemon.py --n {args.n}{' --reference' if args.reference else ''} --leak-requests {args.leak_requests}{f' --device {args.device}' if suffix else ''}`, {args.device.upper() if args.device == 'cpu' else args.device}, {args.size[0]}x{args.size[1]} phantoms, osteo fold 0, saliency.

| run | {args.n} requests | per request |
|---|---|---|
| seed-style loop, {loop} | {seed_s:.1f} s | {seed_s / args.n * 1000:,.0f} ms |
| daemon, all piped at once | {daemon_s:.1f} s | {daemon_s / args.n * 1000:,.0f} ms |
| ratio (seed loop / daemon) | **{seed_s / daemon_s:.1f}x** | |

All cards under `{args.weights}` loaded: ready after {ready_s:.1f} s, RSS {rss_ready:.0f} MB (peak so far {hwm_ready:.0f} MB).
Memory over a stream of 449x954 requests: RSS {rss_10:.0f} MB after 10, {rss_n:.0f} MB after {args.leak_requests}; peak {peak:.0f} MB.
"""
    print(body)
    print(f"written to {write_section('Daemon throughput' + suffix, body)}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
