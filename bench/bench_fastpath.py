"""The osteo fast path against an older checkout, side by side in one run (by hand).

    python bench/bench_fastpath.py --before /tmp/before [--burst 150] [--rounds 5] [--seed-flow]

For each tree (``--before`` DIR, an export of the older commit with its own ``weights/``, and
this one), a ``run_model.py weights/`` daemon with every card loaded, both alive at once and
the lone requests alternating between them (a shared machine's load then falls on both alike):

- start-up: seconds to the ready line, then the first osteo request on a full-size image
  (what a cold start costs, numba's cache included); for this tree also with an empty numba
  cache (``NUMBA_CACHE_DIR`` pointed at a new folder: the first start after an install);
- lone-request latency (``elapsed_ms``, median of ``--rounds``) of every example request of
  the four tasks, and of full-size osteo phantoms (1348x2863, 1435x2943) against the same
  images already resized to 449x954;
- a burst: RSS idle (after the idle heap trim), ``--burst`` full-size osteo requests piped at
  once with RSS sampled every 20 ms (peak), RSS right after the last reply, and after 5 s idle.

``--seed-flow`` adds the seed checkpoint case: an efficientnet-pytorch b0 with its 1000-way
head (as tests/test_seed_compat.py builds it) served with ``--explain saliency`` against the
seed's own flow on the same 1435x2943 image (opencv-rolling-ball, the seed's preprocessing and
saliency, about two minutes). Writes the section "Fast path" of bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from bench.bench_osteo import _vm  # noqa: E402
from bench.bench_precision import example_requests  # noqa: E402
from bench.results import write_section  # noqa: E402

FULL_SIZES = ((1348, 2863), (1435, 2943))


class Daemon:
    """A ``run_model.py`` of one tree, driven through its pipes."""

    def __init__(self, tree: Path, weights: Path | str, *args: str, env: dict[str, str] | None = None) -> None:
        began = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, str(tree / "run_model.py"), str(weights), "--device", "cpu", *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     cwd=tree, env={**os.environ, "PYTHONPATH": str(tree), **(env or {})})
        self.ready = json.loads(self.proc.stdout.readline())
        self.ready_s = time.perf_counter() - began

    def ask(self, request: dict) -> tuple[dict, float]:
        began = time.perf_counter()
        self.proc.stdin.write(json.dumps(request).encode() + b"\n")
        self.proc.stdin.flush()
        reply = json.loads(self.proc.stdout.readline())
        if reply.get("result") != "ok":
            raise RuntimeError(reply)
        return reply, (time.perf_counter() - began) * 1000

    def rss(self) -> float:
        return _vm(self.proc.pid, "VmRSS")

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(120)


def phantoms(work: Path) -> dict[str, Path]:
    """Full-size osteo phantoms (train.synthetic) and the same images resized to 449x954."""
    from PIL import Image

    images = {}
    for height, width in FULL_SIZES:
        folder = work / f"ph{height}x{width}"
        subprocess.run([sys.executable, "-m", "train.synthetic", "osteo", str(folder), "--n", "2",
                        "--size", str(height), str(width), "--seed", str(height)], check=True, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL)
        full = sorted(folder.rglob("*.png"))[0]
        small = work / f"{full.stem}_{height}x{width}_449x954.png"
        with Image.open(full) as image:
            image.convert("L").resize((954, 449), Image.BILINEAR).save(small)
        images[f"{height}x{width}"] = full
        images[f"{height}x{width} resized to 449x954"] = small
    return images


def burst(daemon: Daemon, images: list[Path], n: int, out: Path) -> dict[str, float]:
    """RSS idle, peak during, right after and 5 s after ``n`` piped requests."""
    time.sleep(3.0)  # the daemon trims its heap after 2 s idle
    idle = daemon.rss()
    peak = [idle]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], daemon.rss())
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    began = time.perf_counter()
    requests = [{"id": i, "img_path": str(images[i % len(images)]), "destination_path": str(out / "burst")}
                for i in range(n)]
    daemon.proc.stdin.write(b"".join(json.dumps(r).encode() + b"\n" for r in requests))
    daemon.proc.stdin.flush()
    for _ in requests:
        reply = json.loads(daemon.proc.stdout.readline())
        if reply.get("result") != "ok":
            raise RuntimeError(reply)
    seconds = time.perf_counter() - began
    after = daemon.rss()
    stop.set()
    sampler.join()
    time.sleep(5.0)
    return {"idle": idle, "peak": max(peak[0], after), "after": after, "after_idle": daemon.rss(),
            "seconds": seconds, "n": n}


def measure_trees(trees: dict[str, Path], images: dict[str, Path], args: argparse.Namespace, out: Path) -> dict:
    """Start-up, first request, lone latencies and a burst of each tree's daemon. The lone requests
    alternate between the trees' daemons (both loaded, one working at a time), so that a load
    that comes and goes on a shared machine falls on both columns alike."""
    results: dict = {name: {} for name in trees}
    daemons = {}
    for name, tree in trees.items():
        daemons[name] = daemon = Daemon(tree, tree / "weights")
        results[name]["ready_s"] = daemon.ready_s
        _, results[name]["first_ms"] = daemon.ask({"img_path": str(images["1435x2943"]),
                                                   "destination_path": str(out / name / "first")})
    latency: dict[str, dict[str, list[float]]] = {name: {} for name in trees}
    for _ in range(args.rounds):
        requests = [(f"{r['task']} (examples)", r) for r in example_requests(out)]
        requests += [(f"osteo {label}", {"img_path": str(path), "destination_path": str(out / "lone")})
                     for label, path in images.items()]
        for label, request in requests:
            for name, daemon in daemons.items():
                reply, _ = daemon.ask(request)
                latency[name].setdefault(label, []).append(reply["elapsed_ms"])
    full = [images[f"{h}x{w}"] for h, w in FULL_SIZES]
    for name, daemon in daemons.items():
        results[name]["latency"] = {label: statistics.median(values) for label, values in latency[name].items()}
        results[name]["burst"] = burst(daemon, full, args.burst, out / name)
        daemon.close()
        print(name, json.dumps(results[name], indent=1), flush=True)
    return results


def cold_cache(tree: Path, images: dict[str, Path], out: Path) -> dict[str, float]:
    """Ready time and first request with an empty numba cache (the first start after an install)."""
    cache = Path(tempfile.mkdtemp(prefix="numba-cold-"))
    daemon = Daemon(tree, tree / "weights", env={"NUMBA_CACHE_DIR": str(cache)})
    _, first = daemon.ask({"img_path": str(images["1435x2943"]), "destination_path": str(out / "first")})
    ready = daemon.ready_s
    _, second = daemon.ask({"img_path": str(images["1435x2943"]), "destination_path": str(out / "first")})
    daemon.close()
    shutil.rmtree(cache, ignore_errors=True)
    return {"ready_s": ready, "first_ms": first, "second_ms": second}


def seed_checkpoint(path: Path) -> None:
    """efficientnet-pytorch b0 with the 1000-way head and DataParallel prefixes, as the seed saved it."""
    import torch
    from efficientnet_pytorch import EfficientNet

    torch.manual_seed(0)
    network = EfficientNet.from_name("efficientnet-b0").eval()
    with torch.no_grad():
        network._fc.bias[2:] = -50.0
    torch.save({"state_dict": {f"module.{k}": v for k, v in network.state_dict().items()}}, path)


def seed_flow(checkpoint: Path, image: Path, out: Path) -> tuple[float, str, float]:
    """The seed's run_model.py flow for one request: seconds, diagnosis, probability of C3."""
    import cv2
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from cv2_rolling_ball import subtract_background_rolling_ball
    from efficientnet_pytorch import EfficientNet
    from PIL import Image
    from torchvision import transforms

    network = EfficientNet.from_name("efficientnet-b0")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    network.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    network.eval()
    began = time.perf_counter()
    gray = cv2.imread(str(image), 0)
    background_free, _ = subtract_background_rolling_ball(gray, 180, light_background=False,
                                                          use_paraboloid=True, do_presmooth=True)
    pil = Image.fromarray(background_free).convert("RGB")
    transform = transforms.Compose([transforms.Resize((449, 954)), transforms.ToTensor(),
                                    transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    x = transform(pil)[None].requires_grad_(True)
    logits = network(x)
    predicted = int(logits.argmax())
    logits[0, predicted].backward()
    saliency = x.grad.abs().amax(dim=1)[0].numpy()
    saliency = (saliency - saliency.min()) / max(float(saliency.max() - saliency.min()), 1e-12)
    plt.imsave(out / "seed_saliency.png", plt.cm.hot(saliency))
    shown = np.asarray(pil.resize((954, 449), Image.BILINEAR).convert("L")) / 255.0
    overlay = np.repeat(shown[..., None], 3, axis=2)
    red = plt.cm.hot(saliency)[..., 0]
    overlay[..., 0] = np.clip(overlay[..., 0] + np.where(red < 0.3, 0, red) * 1.5, 0, 1)
    plt.imsave(out / "seed_overlay.png", overlay)
    seconds = time.perf_counter() - began
    probability = float(torch.softmax(logits.detach()[0, :2], dim=0)[1])
    return seconds, ["Healthy Patient", "Patient with Osteoporosis"][predicted], probability


def seed_served(trees: dict[str, Path], checkpoint: Path, image: Path, rounds: int, out: Path) -> list[tuple]:
    """Each tree's daemon on the seed checkpoint with --explain saliency, requests alternating."""
    daemons = {name: Daemon(tree, checkpoint, "--explain", "saliency") for name, tree in trees.items()}
    times: dict[str, list[float]] = {name: [] for name in trees}
    replies = {}
    for _ in range(rounds + 1):
        for name, daemon in daemons.items():
            replies[name], _ = daemon.ask({"img_path": str(image), "destination_path": str(out / name / "seed")})
            times[name].append(replies[name]["elapsed_ms"])
    for daemon in daemons.values():
        daemon.close()
    return [(statistics.median(times[name][1:]) / 1000, replies[name]["diagnosis"], replies[name]["probability"])
            for name in trees]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True, help="an export of the older commit (with weights/)")
    parser.add_argument("--burst", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed-flow", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-fastpath-"))
    images = phantoms(work)
    load = [os.getloadavg()[0]]
    trees = {"before": args.before.resolve(), "after": REPO}
    results = measure_trees(trees, images, args, work)
    load.append(os.getloadavg()[0])
    cold = cold_cache(REPO, images, work / "cold")
    print("cold numba cache:", cold, flush=True)
    b, a = results["before"], results["after"]

    def row(label: str, before: float, after: float, unit: str = "ms") -> str:
        fmt = (lambda v: f"{v:,.0f}") if unit in ("ms", "MB") else (lambda v: f"{v:.1f}")
        return f"| {label} | {fmt(before)} | {fmt(after)} | {after / before:.2f}x |"

    rows = [row("ready line (s)", b["ready_s"], a["ready_s"], "s"), row("first osteo request, 1435x2943", b["first_ms"], a["first_ms"])]
    rows += [row(f"{name} (median)", b["latency"][name], a["latency"][name]) for name in a["latency"]]
    ratio = {k: a["latency"][f"osteo {h}x{w}"] / a["latency"][f"osteo {h}x{w} resized to 449x954"]
             for k, (h, w) in zip(("a", "b"), FULL_SIZES)}
    ratio_before = {k: b["latency"][f"osteo {h}x{w}"] / b["latency"][f"osteo {h}x{w} resized to 449x954"]
                    for k, (h, w) in zip(("a", "b"), FULL_SIZES)}
    bb, ab = b["burst"], a["burst"]
    burst_rows = [row("RSS idle (MB)", bb["idle"], ab["idle"], "MB"), row("RSS peak during the burst (MB)", bb["peak"], ab["peak"], "MB"),
                  row("RSS right after (MB)", bb["after"], ab["after"], "MB"), row("RSS 5 s after (MB)", bb["after_idle"], ab["after_idle"], "MB"),
                  f"| peak / idle | {bb['peak'] / bb['idle']:.2f} | {ab['peak'] / ab['idle']:.2f} | |",
                  f"| 5 s after / idle | {bb['after_idle'] / bb['idle']:.3f} | {ab['after_idle'] / ab['idle']:.3f} | |",
                  row(f"burst wall time (s, {args.burst} requests)", bb["seconds"], ab["seconds"], "s")]
    seed_text = ""
    if args.seed_flow:
        checkpoint = work / "efficientnet-b0_full_C1_C3.pth"
        seed_checkpoint(checkpoint)
        image = images["1435x2943"]
        served_before, served_after = seed_served(trees, checkpoint, image, args.rounds, work)
        print("served:", served_before, served_after, flush=True)
        flow = seed_flow(checkpoint, image, work)
        print("seed flow:", flow, flush=True)
        seed_text = f"""
Seed checkpoint (efficientnet-pytorch b0, 1000-way head, as tests/test_seed_compat.py builds it), `--explain saliency`,
the 1435x2943 phantom; the seed's flow (opencv-rolling-ball, its preprocessing, saliency, two PNGs) timed once, the
daemon's `elapsed_ms` median of {args.rounds} after one warm-up request:

| flow | seconds | diagnosis | probability (C3) | seed flow / this |
|---|---|---|---|---|
| seed's run_model.py flow | {flow[0]:.1f} | {flow[1]} | {flow[2]:.4f} | 1x |
| daemon, before | {served_before[0]:.2f} | {served_before[1]} | {served_before[2]:.4f} | {flow[0] / served_before[0]:.0f}x |
| daemon, after | {served_after[0]:.2f} | {served_after[1]} | {served_after[2]:.4f} | **{flow[0] / served_after[0]:.0f}x** |
"""
    load.append(os.getloadavg()[0])
    body = f"""`python bench/bench_fastpath.py --before /tmp/before --burst {args.burst} --rounds {args.rounds}{' --seed-flow' if args.seed_flow else ''}`
(`/tmp/before`: `git archive` of the commit before this work). CPU, every card under `weights/` loaded; osteo
requests on `train.synthetic` phantoms (no full-size real panoramic is available here: the real ones under
shared/data are downscaled to <= 384 px). Load average {', '.join(f'{x:.1f}' for x in load)} (start, after the
comparison, at the end): the machine is shared with other work, so compare the columns, not the absolute
numbers. Both daemons stay loaded and the lone requests alternate between them; bursts run one daemon at a time.

| lone request, `elapsed_ms` | before | after | after / before |
|---|---|---|---|
{chr(10).join(rows)}

Full-size osteo request / the same image already resized to 449x954: {ratio['a']:.2f} (1348x2863) and
{ratio['b']:.2f} (1435x2943) after, {ratio_before['a']:.2f} and {ratio_before['b']:.2f} before.

Burst: {args.burst} full-size osteo requests (Grad-CAM, both phantoms alternating) piped at once; RSS from /proc, every 20 ms.

| burst | before | after | after / before |
|---|---|---|---|
{chr(10).join(burst_rows)}

Empty numba cache (`NUMBA_CACHE_DIR` a new folder, as on the first start after `pip install`): ready after
{cold['ready_s']:.1f} s, first osteo request {cold['first_ms']:,.0f} ms (served by the numpy path while the kernel
compiles in the background), second {cold['second_ms']:,.0f} ms.
{seed_text}"""
    print(body)
    if not args.no_write:
        print(f"written to {write_section('Fast path', body)}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
