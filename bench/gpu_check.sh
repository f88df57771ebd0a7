#!/usr/bin/env bash
# The issue 7 GPU check, run by hand on a CUDA machine from the repository root:
#
#     bash bench/gpu_check.sh                 # everything goes to $OUT (default /tmp/gpu_check), log in $OUT/gpu_check.log
#
# Steps (each under its own `timeout`; one failing does not stop the others; the summary at
# the end lists PASS/FAIL per step and the exit status is the number of failed steps):
#   install  wheels under .whl/ (packages the machine lacks) -> /tmp/site, on PYTHONPATH
#   env      nvidia-smi, versions, imports
#   replay   the example requests of $TASKS through `run_model.py weights/` on the CPU, on $DEVICE
#            with --precision fp16 (AMP) and on $DEVICE with the default fp32: every reply ok, the ready
#            line's `amp`, then per task the largest difference to the CPU run (numbers, images, masks)
#   bench    bench/bench_daemon.py --device $DEVICE, small N; its section goes to $OUT/RESULTS.md
#   ddp      torchrun (1 process, NCCL on CUDA) -m train.osteo --amp on tiny phantoms; the card must
#            say device $DEVICE, amp true, world_size 1
#   oom      the real server loop in-process on $DEVICE with the CUDA allocator capped
#            (set_per_process_memory_fraction) so a batch of 4 osteo requests cannot fit but one
#            can: the batch must be retried one by one, all ok, health answered after
#
# Environment: DEVICE (cuda; `cpu` runs the same steps on a machine without a GPU, for testing
# this script), TASKS (tasks to replay; add brixia here), STEPS (which steps), BUDGET_S (all
# steps together stop starting after this many seconds; default 450), OUT, SKIP_INSTALL=1.
set -u -o pipefail

DEVICE=${DEVICE:-cuda}
TASKS=${TASKS:-"osteo scar handbone"}
STEPS=${STEPS:-"install env replay bench ddp oom"}
BUDGET_S=${BUDGET_S:-450}
OUT=${OUT:-/tmp/gpu_check}
REPO=$(pwd)
WORK=$(mktemp -d /tmp/gpu_check_work.XXXXXX)
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 DEVICE TASKS OUT REPO WORK
STARTED=$SECONDS
declare -A RESULT=()

# run STEP TIMEOUT_S COMMAND...: a step under `timeout`, cut to what is left of the budget.
run() {
    local step=$1 limit=$2; shift 2
    local left=$((BUDGET_S - (SECONDS - STARTED)))
    if [[ " $STEPS " != *" $step "* ]]; then return 0; fi
    if ((left < 20)); then
        echo "=== $step: SKIPPED (budget of ${BUDGET_S}s spent)"; RESULT[$step]=SKIPPED; return 0
    fi
    ((limit > left)) && limit=$left
    echo; echo "=== $step (timeout ${limit}s, $((SECONDS - STARTED))s into the check)"
    local began=$SECONDS
    timeout -k 10 "$limit" bash -c "$*"
    local rc=$?
    if ((rc == 0)); then RESULT[$step]=PASS; else RESULT[$step]="FAIL (exit $rc$( ((rc == 124)) && echo ', timed out'))"; fi
    echo "=== $step: ${RESULT[$step]} in $((SECONDS - began))s"
}

step_install() {
    local target=/tmp/site
    rm -rf "$target"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$target" \
        .whl/*.whl || return 1
    # pylibjpeg-libjpeg 2.5.0 ships for glibc >= 2.31 only; 2.4.0 is the fallback.
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$target" \
        .whl/libjpeg/pylibjpeg_libjpeg-2.5.0-*.whl 2>/dev/null ||
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$target" \
            .whl/libjpeg/pylibjpeg_libjpeg-2.4.0-*.whl || return 1
    ls "$target"
}

step_env() {
    nvidia-smi || echo "(no nvidia-smi)"
    python3 - <<'EOF'
import importlib, os, platform, sys
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| cudnn", torch.backends.cudnn.version(), "| cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"  cuda:{i} {p.name}, {p.total_memory / 2**30:.1f} GiB, sm {p.major}.{p.minor}")
failed = []
for name in ("numpy", "scipy", "cv2", "PIL", "skimage", "sklearn", "pandas", "matplotlib", "timm", "safetensors",
             "tqdm", "huggingface_hub", "segmentation_models_pytorch", "efficientnet_pytorch", "pytorch_grad_cam",
             "ttach", "pydicom", "pylibjpeg", "libjpeg", "openjpeg", "rle", "jpeg_ls", "torchvision"):
    try:
        module = importlib.import_module(name)
        where = getattr(module, "__file__", "") or ""
        print(f"  {name:28s} {getattr(module, '__version__', '?'):12s} {'(/tmp/site)' if where.startswith('/tmp/site') else ''}")
    except Exception as exc:
        failed.append(name)
        print(f"  {name:28s} MISSING: {exc}")
sys.exit(1 if [n for n in failed if n not in ("jpeg_ls",)] else 0)
EOF
}

step_replay() {
    python3 - <<'EOF'
"""Replay the example requests on the CPU and on DEVICE (AMP, then fp32); compare the predictions."""
import json, os, statistics, subprocess, sys, time
from pathlib import Path
import numpy as np
from PIL import Image

repo, work, out, device = Path(os.environ["REPO"]), Path(os.environ["WORK"]), Path(os.environ["OUT"]), os.environ["DEVICE"]
tasks = os.environ["TASKS"].split()
files = {task: repo / "examples" / ("requests.jsonl" if task == "osteo" else f"{task}_requests.jsonl") for task in tasks}
# fp32 before AMP: the first daemon on a fresh GPU pays one-off CUDA/cuDNN loading, which
# would otherwise be charged to AMP (set REPLAY_AMP_FIRST=1 to see it).
runs = {"cpu": ["--device", "cpu"]}
amp_run = {device if device != "cpu" else "cpu-again": ["--device", device, "--precision", "fp16"]}
fp32_run = {f"{device}-fp32": ["--device", device]}
runs.update({**amp_run, **fp32_run} if os.environ.get("REPLAY_AMP_FIRST") == "1" else {**fp32_run, **amp_run})
failures = []

def requests_for(label):
    lines = []
    for task, path in files.items():
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            request = json.loads(line)
            if "op" not in request and request.get("task", "osteo") not in tasks:
                continue
            if "img_path" in request:
                request["img_path"] = str((repo / request["img_path"]).resolve())
            if "destination_path" in request:
                request["destination_path"] = str(work / "replay" / label / task)
            lines.append(request)
    return lines

replies = {}
for label, args in runs.items():
    requests = requests_for(label)
    began = time.perf_counter()
    run = subprocess.run([sys.executable, str(repo / "run_model.py"), str(repo / "weights"), "--tasks", ",".join(tasks),
                          *args], input=b"".join(json.dumps(r).encode() + b"\n" for r in requests),
                         capture_output=True, cwd=work, timeout=200)
    wall = time.perf_counter() - began
    (out / f"replay_{label}.stderr.log").write_bytes(run.stderr)
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    if run.returncode != 0 or not lines:
        failures.append(f"{label}: exit {run.returncode}; stderr tail: {run.stderr.decode(errors='replace')[-1500:]}")
        continue
    ready, answers = lines[0], lines[1:]
    (out / f"replay_{label}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    print(f"{label}: ready device {ready.get('device')}, precision {ready.get('precision')}, amp {ready.get('amp')}, "
          f"{len(answers)} replies in {wall:.1f} s (start-up included)")
    for task, status in ready["tasks"].items():
        if not status.get("available"):
            failures.append(f"{label}: {task} unavailable: {status.get('reason')}")
        elif label != "cpu" and device != "cpu" and not status.get("device", "").startswith("cuda"):
            failures.append(f"{label}: {task} loaded on {status.get('device')}, not CUDA")
    expected_amp = sorted(tasks) if label == device and device != "cpu" else []
    if ready.get("amp") != expected_amp:
        failures.append(f"{label}: ready line amp {ready.get('amp')}, expected {expected_amp}")
    if len(answers) != len(requests):
        failures.append(f"{label}: {len(answers)} replies to {len(requests)} requests")
    for request, answer in zip(requests, answers):
        if answer.get("result") != "ok":
            failures.append(f"{label}: {request} -> {answer}")
    for task in tasks:
        times = [a["elapsed_ms"] for a in answers if a.get("task") == task and "elapsed_ms" in a]
        if times:
            print(f"    {task:9s} elapsed_ms median {statistics.median(times):8.1f}  max {max(times):8.1f}  (n={len(times)})")
    replies[label] = [(request, answer) for request, answer in zip(requests, answers) if "op" not in request]

def numbers(value, prefix=""):
    """Flatten the numeric fields of a reply (probabilities, scores, areas ...), path -> float."""
    if isinstance(value, bool):
        return {prefix: float(value)}
    if isinstance(value, (int, float)):
        return {prefix: float(value)}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in numbers(item, f"{prefix}[{i}]").items()}
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in numbers(item, f"{prefix}.{key}" if prefix else key).items()}
    return {}

def paths(reply):
    """The files a reply names: ``*_path`` strings and the values of ``*_paths`` objects."""
    found = {}
    for key, value in reply.items():
        if isinstance(value, str) and key.endswith("_path") and value:
            found[key] = value
        elif isinstance(value, dict) and key.endswith("_paths"):
            found.update({f"{key}.{k}": v for k, v in value.items() if isinstance(v, str)})
    return found

SKIP = {"elapsed_ms", "id"}
print()
for label in [l for l in replies if l != "cpu"]:
    if "cpu" not in replies:
        break
    print(f"{label} vs cpu:")
    for task in tasks:
        worst, worst_key, labels_differ, image_diff, dice = 0.0, "", [], [], []
        pairs = [(a, b) for (_, a), (_, b) in zip(replies["cpu"], replies[label]) if a.get("task") == task]
        for a, b in pairs:
            na, nb = numbers({k: v for k, v in a.items() if k not in SKIP and k != "model"}), \
                     numbers({k: v for k, v in b.items() if k not in SKIP and k != "model"})
            for key in na.keys() & nb.keys():
                scale = max(1.0, abs(na[key])) if key.startswith("areas_px") else 1.0  # areas: relative
                diff = abs(na[key] - nb[key]) / scale
                if diff > worst:
                    worst, worst_key = diff, key
            for key in ("diagnosis", "label", "severity", "global_score", "region_scores", "mode"):
                if key in a and a[key] != b.get(key):
                    labels_differ.append(f"{a.get('id', '?')}.{key}: {a[key]} vs {b.get(key)}")
            pa, pb = paths(a), paths(b)
            for key in pa.keys() & pb.keys():
                if pa[key].endswith(".png"):
                    x = np.asarray(Image.open(pa[key]).convert("RGB"), np.float32)
                    y = np.asarray(Image.open(pb[key]).convert("RGB"), np.float32)
                    if x.shape == y.shape:
                        image_diff.append((np.abs(x - y).mean() / 255, key))
                elif pa[key].endswith(".npz"):
                    ma, mb = np.load(pa[key]), np.load(pb[key])
                    for name in ma.files:
                        inter = np.count_nonzero(ma[name] & mb[name])
                        total = np.count_nonzero(ma[name]) + np.count_nonzero(mb[name])
                        dice.append(((2 * inter + 1e-4) / (total + 1e-4), name))
        line = f"  {task:9s} max abs diff {worst:.2e} ({worst_key or '-'}) over {len(pairs)} replies"
        if image_diff:
            line += f"; images: worst mean |diff| {max(image_diff)[0]:.4f} ({max(image_diff)[1]})"
        if dice:
            line += f"; masks: min Dice {min(dice)[0]:.4f} ({min(dice)[1]})"
        print(line)
        for item in labels_differ:
            print(f"    prediction differs: {item}")
if failures:
    print("\nFAILURES:\n  " + "\n  ".join(failures))
sys.exit(1 if failures else 0)
EOF
}

step_bench() {
    python3 bench/bench_daemon.py --device "$DEVICE" --n "${BENCH_N:-8}" --leak-requests "${BENCH_LEAK:-50}" \
        --results "$OUT/RESULTS.md"
}

step_ddp() {
    local data=$WORK/osteo_phantoms
    python3 -m train.synthetic osteo "$data" --n 8 --size 112 238 --seed 5 >/dev/null || return 1
    rm -rf "$OUT/ddp"
    python3 -m torch.distributed.run --standalone --nproc_per_node=1 -m train.osteo "$data" --out "$OUT/ddp" --amp \
        --width-coefficient 0.1 --depth-coefficient 0.1 --input-size 64 128 --folds 2 --epochs 1 --batch-size 4 \
        --precise-bn 1 --seed 0 || return 1
    python3 - <<'EOF'
import json, os, sys
card = json.load(open(os.path.join(os.environ["OUT"], "ddp", "card.json")))
training = card["training"]
print("card training:", {k: training.get(k) for k in ("device", "amp", "world_size", "torch")})
device = os.environ["DEVICE"].split(":")[0]
ok = training.get("device") == device and training.get("world_size") == 1 and training.get("amp") is (device == "cuda")
sys.exit(0 if ok else 1)
EOF
}

step_oom() {
    if [[ $DEVICE != cuda* ]]; then echo "no CUDA: the real out-of-memory path needs a GPU (tests/test_daemon_oom.py covers the logic)"; return 0; fi
    python3 - <<'EOF'
"""A batch of 4 osteo requests that cannot fit under a capped CUDA allocator: retried one by one."""
import json, os, sys, threading
from pathlib import Path
import torch
repo = Path(os.environ["REPO"]); sys.path.insert(0, str(repo))
from daemon.handlers.base import Settings
from daemon.registry import load_registry
from daemon.server import Server

device = torch.device(os.environ["DEVICE"])
if device.index is None:
    device = torch.device("cuda", torch.cuda.current_device())  # set_per_process_memory_fraction wants an index
registry = load_registry(repo / "weights", Settings(device=device), ["osteo"])
handler = registry.handlers["osteo"]
prepared = handler.preprocess(handler.validate({"img_path": str(repo / "examples/osteo_c3.png"),
                                                "destination_path": os.path.join(os.environ["WORK"], "oom")}))
def peak_of(n):
    torch.cuda.synchronize(); torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    handler.infer([prepared] * n)
    return torch.cuda.max_memory_allocated(device) - base, base
one, base = peak_of(1)
four, _ = peak_of(4)
total = torch.cuda.get_device_properties(device).total_memory
budget = base + 1.5 * one  # one fits with room; four (about 4x one) cannot, whatever algorithms cuDNN falls back to
if four < 2 * one:
    print(f"note: a batch of 4 needs only {four / one:.1f}x the memory of one; the cap may not make it fail")
print(f"osteo infer peak: batch 1 {one / 2**20:.0f} MiB, batch 4 {four / 2**20:.0f} MiB; cap at {budget / 2**20:.0f} MiB")
torch.cuda.empty_cache()
torch.cuda.set_per_process_memory_fraction(budget / total, device)
calls = []
real_infer = handler.infer
def counting(batch):
    calls.append(len(batch))
    return real_infer(batch)
handler.infer = counting
class Stream:
    data = b""
    def write(self, data):
        Stream.data += data
        return len(data)
server = Server(Settings(device=device), "osteo", Stream(), max_batch=4, workers=2, registry=registry)
for i in range(6):
    server.lines.put(json.dumps({"id": i, "img_path": str(repo / "examples/osteo_c3.png"),
                                 "destination_path": os.path.join(os.environ["WORK"], "oom")}).encode())
server.lines.put(b'{"op": "health"}')
r, w = os.pipe(); os.close(w)
server.serve(r)
ready, *replies = [json.loads(line) for line in Stream.data.splitlines()]
print("infer calls (batch sizes):", calls)
for reply in replies:
    print("  ", {k: reply.get(k) for k in ("id", "result", "label", "probability", "op", "error")})
ok = [r.get("result") for r in replies] == ["ok"] * 7 and calls[0] == 4 and calls[1:5] == [1, 1, 1, 1]
print("batch retried one by one after a real CUDA out of memory:", "yes" if ok else "NO")
sys.exit(0 if ok else 1)
EOF
}

export -f step_install step_env step_replay step_bench step_ddp step_oom
echo "gpu_check: DEVICE=$DEVICE TASKS='$TASKS' STEPS='$STEPS' BUDGET_S=$BUDGET_S OUT=$OUT $(date -Is)"
if [[ ${SKIP_INSTALL:-0} != 1 ]]; then
    run install 90 step_install
    export PYTHONPATH=/tmp/site:$REPO${PYTHONPATH:+:$PYTHONPATH}
fi
run env 60 step_env
run replay 300 step_replay
run bench 200 step_bench
run ddp 150 step_ddp
run oom 120 step_oom

echo; echo "=== summary ($((SECONDS - STARTED))s)"
failed=0
for step in $STEPS; do
    echo "  $step: ${RESULT[$step]:-not run}"
    [[ ${RESULT[$step]:-} == FAIL* ]] && failed=$((failed + 1))
done
rm -rf "$WORK"
exit $failed
