"""Command line of the daemon: ``python run_model.py WEIGHTS [options]``."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from daemon.protocol import TASKS

EPILOG = """\
protocol: one JSON request per line on stdin, one JSON reply per line on stdout.
  {"img_path": "pano.png", "destination_path": "out/"}              osteo (seed-compatible)
  {"task": "osteo", "id": 7, "img_path": "...", "destination_path": "..."}
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
                        help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--default-task", default="osteo", choices=TASKS,
                        help="task of a request without a 'task' field (default: osteo, as the seed)")
    parser.add_argument("--tasks", default=None,
                        help="comma-separated tasks to load (default: every card found)")
    parser.add_argument("--output-root", type=Path, default=None,
                        help="refuse (path_not_allowed) any destination_path outside this folder")
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
    if args.output_root is not None:
        args.output_root = Path(os.path.realpath(args.output_root))
        if not args.output_root.is_dir():
            parser.error(f"--output-root {args.output_root} is not an existing folder")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from daemon.server import claim_stdout

    protocol_out = claim_stdout()  # before heavy imports: nothing they print may reach the protocol
    logging.basicConfig(stream=sys.stderr, level=getattr(logging, args.log_level),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    began = time.perf_counter()

    from daemon.handlers.base import Settings
    from daemon.registry import load_registry, pick_device
    from daemon.server import Server
    from tasks import imaging

    settings = Settings(device=pick_device(args.device), output_root=args.output_root, explain=args.explain,
                        max_pixels=args.max_pixels or imaging.DEFAULT_MAX_PIXELS, fold=args.fold)
    server = Server(settings, args.default_task, protocol_out, max_batch=args.max_batch)
    server.install_signal_handlers()
    server.registry = load_registry(args.weights, settings, args.tasks)
    logging.getLogger("daemon").info("ready in %.1f s on %s: %s", time.perf_counter() - began, settings.device,
                                     ", ".join(sorted(server.registry.handlers)) or "no task available")
    return server.serve()
