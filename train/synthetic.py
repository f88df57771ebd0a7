"""Write synthetic phantom data in a task's real training layout: ``python -m train.synthetic TASK OUT ...``.

Tests and the demo weights train on these; they are never clinical. A new task adds its
generator module under ``train/phantoms/`` and one entry in ``GENERATORS``.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

# task -> (module, writer function, default (height, width))
GENERATORS = {
    "osteo": ("train.phantoms.osteo", "write_osteo_phantoms", (225, 477)),
    "handbone": ("train.phantoms.handbone", "write_handbone_phantoms", (512, 512)),
    "scar": ("train.phantoms.scar", "write_scar_phantoms", (96, 128)),
    "brixia": ("train.phantoms.brixia", "write_brixia_phantoms", (256, 256)),
}


def generate(task: str, out: str | Path, n: int, size: tuple[int, int] | None = None, seed: int = 0) -> dict:
    """Write ``n`` phantoms of ``task`` into ``out``; returns the generator's note (also ``out/synthetic.json``)."""
    if task not in GENERATORS:
        raise ValueError(f"no phantom generator for {task!r}; known: {', '.join(sorted(GENERATORS))}")
    module, function, default_size = GENERATORS[task]
    writer = getattr(importlib.import_module(module), function)
    return writer(out, n=n, size=tuple(size or default_size), seed=seed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.synthetic",
                                     description="Write synthetic phantom training data for a task.")
    parser.add_argument("task", choices=sorted(GENERATORS), help="which task's data layout to write")
    parser.add_argument("out", type=Path, help="output folder (class folders etc. are created inside)")
    parser.add_argument("--n", type=int, default=20, help="number of images (split evenly over classes)")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None,
                        help="image height and width (osteo default 225 477; 1348 2863 is the real size)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same images)")
    args = parser.parse_args(argv)
    note = generate(args.task, args.out, args.n, args.size, args.seed)
    print(f"wrote {args.n} {args.task} phantoms to {args.out}: {note.get('class_counts')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
