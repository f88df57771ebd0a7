"""Command line of the daemon: ``python run_model.py WEIGHTS [options]``."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from daemon.protocol import TASKS

if TYPE_CHECKING:
    from daemon.server import Server

EPILOG = """\
protocol: one JSON request per line on stdin, one JSON reply per line on stdout.
  {"img_path": "pano.png", "destination_path": "out/"}              osteo (seed-compatible)
  {"task": "osteo", "id": 7, "img_path": "...", "destination_path": "..."}
  {"task": "brixia", "img_path": "cxr.dcm", "destination_path": "out/", "dicom": true}   + DICOM SEG/SR/SC
  {"op": "health"} | {"op": "models"} | {"op": "shutdown"}
The first stdout line is {"event": "ready", "message": "Loaded pretrained weights", ...}.
Logs go to stderr. EOF, SIGTERM or SIGINT: pending requests are answered, exit status 0.
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="run_model.py", description="Serve the medical imaging models over stdin/stdout JSON lines.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("weights", type=Path,
                        help="weights folder holding <task>/card.json (e.g. weights/), or a seed osteo "
                             "model.pth (EfficientNet variant and labels read from its file name)")
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N; or a placement per "
                             "task for several GPUs, e.g. 'osteo=cuda:0,handbone=cuda:1' (tasks not named "
                             "use auto, or a bare entry: 'cuda:0,handbone=cuda:1') (default: auto)")
    parser.add_argument("--default-task", default="osteo", choices=TASKS,
                        help="task of a request without a 'task' field (default: osteo, as the seed)")
    parser.add_argument("--tasks", default=None,
                        help="comma-separated tasks to load (default: every card found)")
    parser.add_argument("--output-root", type=Path, default=None,
                        help="refuse (path_not_allowed) any destination_path outside this folder")
    parser.add_argument("--input-root", type=Path, default=None,
                        help="refuse (path_not_allowed) any img_path outside this folder")
    parser.add_argument("--explain", default="gradcam", choices=("gradcam", "saliency"),
                        help="explanation map: Grad-CAM on the last conv block, or the seed's input "
                             "saliency (default: gradcam); a request may override it with 'explain'")
    parser.add_argument("--fold", type=int, default=None,
                        help="use only this fold of each card instead of the mean over all folds")
    parser.add_argument("--max-pixels", type=int, default=None,
                        help="refuse images with more pixels than this (image_too_large), read from the "
                             "header before decoding (default: 80,000,000)")
    parser.add_argument("--max-batch", type=int, default=4,
                        help="most requests of one task inferred together when several are waiting (default: 4)")
    parser.add_argument("--max-queue-mb", type=float, default=64,
                        help="preprocessed requests waiting for the model hold at most about this many MB; "
                             "preprocessing pauses while they hold more (default: 64)")
    parser.add_argument("--workers", type=int, default=2,
                        help="threads decoding and preprocessing requests while the model infers (default: 2)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "fp16"),
                        help="fp16: float16 autocast (AMP) for forward passes and explanations on CUDA (pays "
                             "off for large networks; measured slower for the small demo ones); fp32: float32 "
                             "everywhere. CPU is always float32 (default: fp32)")
    parser.add_argument("--dicom", action="store_true",
                        help="also write DICOM objects (SEG, SR, Secondary Capture) for every task request that "
                             "does not say \"dicom\": false; listed in the reply's dicom_paths")
    parser.add_argument("--no-kind-check", action="store_true",
                        help="do not check that images are of the kind their task takes (the image-kind gate of "
                             "WEIGHTS/kind); a request can also skip it with \"check_kind\": false")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="stderr log level (default: INFO)")
    args = parser.parse_args(argv)
    if args.tasks is not None:
        args.tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
        unknown = sorted(set(args.tasks) - set(TASKS))
        if unknown:
            parser.error(f"--tasks: unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    if not args.weights.exists():
        parser.error(f"weights path {args.weights} does not exist")
    for flag in ("output_root", "input_root"):
        root = getattr(args, flag)
        if root is not None:
            setattr(args, flag, Path(os.path.realpath(root)))
            if not getattr(args, flag).is_dir():
                parser.error(f"--{flag.replace('_', '-')} {root} is not an existing folder")
    try:
        args.device = parse_device_spec(args.device)
    except ValueError as exc:
        parser.error(f"--device: {exc}")
    return args


def parse_device_spec(spec: str) -> tuple[str, dict[str, str]]:
    """'cuda' -> ('cuda', {}); 'cuda:0,handbone=cuda:1' -> ('cuda:0', {'handbone': 'cuda:1'})."""
    default, per_task = "auto", {}
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        task, sep, device = part.partition("=")
        if not sep:
            default = part
        elif task.strip() not in TASKS:
            raise ValueError(f"unknown task {task.strip()!r} in {spec!r}; tasks: {', '.join(TASKS)}")
        else:
            per_task[task.strip()] = device.strip()
    return default, per_task


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from daemon.protocol import claim_stdout

    protocol_out = claim_stdout()  # before heavy imports (torch, timm ...): nothing they print may reach the protocol
    logging.basicConfig(stream=sys.stderr, level=getattr(logging, args.log_level),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    began = time.perf_counter()
    if args.tasks is None or "osteo" in args.tasks:
        from tasks import rolling_ball_numba
        rolling_ball_numba.start_compiling()  # loads beside torch's imports; numpy serves until it is ready
    server = make_server(args, protocol_out)
    server.install_signal_handlers()
    load_models(server, args)
    logging.getLogger("daemon").info("ready in %.1f s on %s: %s", time.perf_counter() - began,
                                     server.settings.device,
                                     ", ".join(sorted(server.registry.handlers)) or "no task available")
    return server.serve()


def make_server(args: argparse.Namespace, out: BinaryIO | None = None) -> Server:
    """The daemon's ``Server`` for parsed options, models not loaded yet (``load_models``). The Ray
    batch runner's actors build theirs here too, so they serve exactly as ``run_model.py`` does."""
    from daemon.handlers.base import Settings
    from daemon.registry import pick_device
    from daemon.server import Server, tune_heap
    from tasks import imaging

    tune_heap()
    default_device, _ = args.device
    settings = Settings(device=pick_device(default_device), output_root=args.output_root,
                        input_root=args.input_root, explain=args.explain,
                        max_pixels=args.max_pixels or imaging.DEFAULT_MAX_PIXELS, fold=args.fold,
                        precision=args.precision, dicom=args.dicom,
                        check_kind=not args.no_kind_check)
    return Server(settings, args.default_task, out, max_batch=args.max_batch, workers=args.workers,
                  max_queue_bytes=int(args.max_queue_mb * (1 << 20)))


def load_models(server: Server, args: argparse.Namespace) -> None:
    """Load every card (or the seed .pth) into ``server``'s registry, tasks placed as ``--device`` says."""
    from daemon.registry import load_registry, pick_device

    if args.dicom:
        import daemon.dicom_out  # noqa: F401  highdicom's import, paid before the ready line rather than by a request
    _, task_devices = args.device
    server.registry = load_registry(args.weights, server.settings, args.tasks,
                                    {task: pick_device(device) for task, device in task_devices.items()})
