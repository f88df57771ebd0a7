"""The fast path's two ratios on this tree alone, without the before tree and the bursts (a few minutes):
full-size osteo requests vs the same images resized to 449x954, and the seed checkpoint served with
``--explain saliency`` vs the seed's own flow. Uses bench/bench_fastpath.py's functions; prints, by hand
into bench/RESULTS.md.

    python bench/bench_fastpath_quick.py [--seed-only]
"""
import os, sys, statistics, tempfile, json
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_fastpath import Daemon, phantoms, seed_checkpoint, seed_flow, REPO
work = Path(tempfile.mkdtemp(prefix='fastcheck-'))
print('load', os.getloadavg(), flush=True)
images = phantoms(work)
SEED_ONLY = '--seed-only' in sys.argv
d = None if SEED_ONLY else Daemon(REPO, REPO / 'weights', '--tasks', 'osteo')
if not SEED_ONLY:
    print('ready_s', round(d.ready_s, 1), flush=True)
    d.ask({"img_path": str(images["1435x2943"]), "destination_path": str(work / "warm")})
    lat = {}
    for _ in range(7):
        for label, path in images.items():
            reply, _ = d.ask({"img_path": str(path), "destination_path": str(work / "lone")})
            lat.setdefault(label, []).append(reply["elapsed_ms"])
    d.close()
    med = {k: statistics.median(v) for k, v in lat.items()}
    print(json.dumps(med, indent=1), flush=True)
    for h, w in ((1348, 2863), (1435, 2943)):
        print(f'{h}x{w}: full / resized = {med[f"{h}x{w}"] / med[f"{h}x{w} resized to 449x954"]:.2f}', flush=True)
ck = work / 'efficientnet-b0_full_C1_C3.pth'; seed_checkpoint(ck)
image = images['1435x2943']
s = Daemon(REPO, ck, '--explain', 'saliency')
times = []
for k in range(8):
    reply, _ = s.ask({"img_path": str(image), "destination_path": str(work / "seed")})
    times.append(reply['elapsed_ms'])
s.close()
served = statistics.median(times[1:]) / 1000
print('served seed', served, reply['diagnosis'], reply['probability'], flush=True)
flow = seed_flow(ck, image, work)
print('seed flow', flow, 'ratio', flow[0] / served, flush=True)
print('load', os.getloadavg(), flush=True)
