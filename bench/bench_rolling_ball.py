"""Rolling-ball background subtraction speed and agreement, run by hand.

    python bench/bench_rolling_ball.py [--height 1348 --width 2863] [--image pano.png]
                                       [--radius 180] [--runs 5] [--reference] [--skimage] [--numpy]

Times ``tasks.rolling_ball.subtract_background`` (the compiled path, and with --numpy also the
vectorised fallback; median of --runs after a warm-up) on a
synthetic panoramic-like 8-bit image of the real size (or --image). --reference also times the
seed's opencv-rolling-ball once (about a minute at full size) and reports the max/mean absolute
difference; --skimage times skimage.restoration.rolling_ball (a different, far slower algorithm)
on a --skimage-crop crop only. Results replace the "Rolling ball" section of bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from bench.results import write_section  # noqa: E402
from tasks import rolling_ball_numba  # noqa: E402
from tasks.rolling_ball import subtract_background  # noqa: E402


def panoramic_like(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Dark field, smooth exposure gradient, U-shaped mandible with trabecular texture, teeth, noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    u = (xx - width / 2) / (width / 2)
    image = 35 + 45 * np.exp(-u ** 2 / 0.5) * (0.5 + yy / height) + 20 * np.sin(2.5 * yy / height)
    arch = 0.62 * height - 0.3 * height * u ** 2  # centre line of the lower jaw (a U)
    jaw = np.exp(-((yy - arch) / (0.14 * height)) ** 2) * (np.abs(u) < 0.95)
    texture = cv2.GaussianBlur(rng.normal(0, 1, (height, width)).astype(np.float32), (0, 0), 3)
    image += jaw * (70 + 120 * texture)
    image += 60 * np.exp(-((yy - arch - 0.13 * height) / (0.015 * height)) ** 2) * (np.abs(u) < 0.9)  # cortex
    y = np.arange(height, dtype=np.float32)
    for k in range(28):  # teeth: bright vertical blobs above the jaw line
        cx = width * (0.14 + 0.72 * k / 27)
        cy = 0.62 * height - 0.3 * height * ((cx - width / 2) / (width / 2)) ** 2 - 0.2 * height
        x0, x1 = max(int(cx - 0.04 * width), 0), min(int(cx + 0.04 * width), width)
        x = np.arange(x0, x1, dtype=np.float32)
        image[:, x0:x1] += 90 * np.outer(np.exp(-((y - cy) / (0.1 * height)) ** 4), np.exp(-((x - cx) / (0.011 * width)) ** 2))
    image += rng.normal(0, 7, (height, width)).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def diff_stats(a: np.ndarray, b: np.ndarray) -> tuple[int, float, int]:
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return int(diff.max()), float(diff.mean()), int(np.count_nonzero(diff))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--height", type=int, default=1348)
    parser.add_argument("--width", type=int, default=2863)
    parser.add_argument("--image", type=Path, help="an 8-bit image file to use instead of the synthetic one")
    parser.add_argument("--radius", type=float, default=180)
    parser.add_argument("--runs", type=int, default=5, help="timed runs of ours (median reported)")
    parser.add_argument("--reference", action="store_true", help="also time opencv-rolling-ball once and compare")
    parser.add_argument("--skimage", action="store_true", help="also time skimage.restoration.rolling_ball on a crop")
    parser.add_argument("--skimage-crop", type=int, nargs=2, default=(128, 256), metavar=("H", "W"))
    parser.add_argument("--numpy", action="store_true", help="also time the vectorised numpy fallback")
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    args = parser.parse_args()

    if args.image:
        image = cv2.imread(str(args.image), cv2.IMREAD_GRAYSCALE)
        if image is None:
            parser.error(f"cannot read {args.image}")
        source = f"`{args.image.name}`"
    else:
        image = panoramic_like(args.height, args.width)
        source = "synthetic panoramic-like image (`panoramic_like`)"
    height, width = image.shape
    load = os.getloadavg()[0]
    print(f"image {height}x{width}, radius {args.radius}, load average {load:.1f}")

    compiled = rolling_ball_numba.wait(120)
    paths = [("compiled (numba)", True)] if compiled else []
    if args.numpy or not compiled:
        paths.append(("vectorised numpy fallback", False))
    rows, agreement, results, medians = [], [], {}, {}
    for label, use_compiled in paths:
        ready = rolling_ball_numba.ready
        if not use_compiled:
            rolling_ball_numba.ready = lambda: False
        try:
            subtract_background(image, args.radius)  # warm-up
            times, cpu_times = [], []
            for _ in range(args.runs):
                cpu_start = time.process_time()
                seconds, ours = timed(subtract_background, image, args.radius)
                cpu_times.append(time.process_time() - cpu_start)
                times.append(seconds)
        finally:
            rolling_ball_numba.ready = ready
        results[label] = ours
        medians[label] = median = statistics.median(times)
        cpu = statistics.median(cpu_times)
        print(f"ours, {label}: median {median:.3f} s, min {min(times):.3f} s, CPU {cpu:.3f} s over {args.runs} runs")
        rows.append(f"| ours, {label} (`tasks.rolling_ball`) | {height}x{width} | {median:.3f} (min {min(times):.3f}) | "
                    f"median of {args.runs}; CPU time {cpu:.3f} s |")
    ours, median = results[paths[0][0]], medians[paths[0][0]]
    if len(results) == 2:
        worst, mean, count = diff_stats(*results.values())
        agreement.append(f"Compiled vs numpy path: {count} of {ours.size} pixels differ (max {worst}).")

    if args.reference:
        from cv2_rolling_ball import subtract_background_rolling_ball
        print("reference: running opencv-rolling-ball once (about a minute at full size) ...", flush=True)
        seconds, (theirs, _) = timed(subtract_background_rolling_ball, image.copy(), args.radius,
                                     light_background=False, use_paraboloid=True, do_presmooth=True)
        worst, mean, count = diff_stats(ours, theirs)
        print(f"reference: {seconds:.1f} s; ours vs reference: max {worst}, mean {mean:.2e}, {count} pixels differ")
        rows.append(f"| opencv-rolling-ball 1.0.1 (seed) | {height}x{width} | {seconds:.1f} | once; {seconds / median:.0f}x ours |")
        agreement.append(f"Ours vs opencv-rolling-ball on this image: max abs difference {worst} grey levels, "
                         f"mean {mean:.2e}, {count} of {ours.size} pixels differ.")

    if args.skimage:
        from skimage.restoration import rolling_ball
        crop_h, crop_w = min(args.skimage_crop[0], height), min(args.skimage_crop[1], width)
        crop = image[:crop_h, :crop_w]
        print(f"skimage: rolling_ball on a {crop_h}x{crop_w} crop ...", flush=True)
        seconds, background = timed(rolling_ball, crop, radius=args.radius)
        per_pixel = seconds / crop.size
        ours_crop, _ = timed(subtract_background, crop, args.radius)
        rows.append(f"| skimage.restoration.rolling_ball | {crop_h}x{crop_w} crop | {seconds:.1f} | "
                    f"{per_pixel * 1e6:.0f} us/pixel, ~{per_pixel * height * width / 60:.0f} min at full size; "
                    f"ours {ours_crop * 1e3:.0f} ms on the crop |")
        print(f"skimage: {seconds:.1f} s ({per_pixel * 1e6:.0f} us/pixel)")

    command = ("python bench/bench_rolling_ball.py" + " --reference" * args.reference + " --skimage" * args.skimage
               + " --numpy" * args.numpy + (f" --image {args.image.name}" if args.image else ""))
    body = "\n".join([
        f"ImageJ sliding paraboloid (radius {args.radius:g}, dark background, 3x3 presmoothing), as the osteo "
        f"seed calls opencv-rolling-ball. Command: `{command}`.", "",
        f"Input: {source}, {height}x{width}. Wall-clock seconds; load average at start {load:.1f} "
        "(the machine is shared, so timings are noisy).", "",
        "| implementation | image | seconds | notes |", "|---|---|---|---|", *rows, "", *agreement,
    ])
    if args.no_write:
        print(body)
    else:
        print(f"wrote {write_section('Rolling ball', body)}")


if __name__ == "__main__":
    main()
