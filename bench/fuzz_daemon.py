"""A fuzz run against the real daemon, by hand: thousands of hostile lines, then ``health``.

    python bench/fuzz_daemon.py --weights weights/ [--lines 5000] [--seed 0]

Random bytes, truncated JSON, deep nesting, a 10 MB line, wrong types for every field, unknown
fields, empty lines, folders, devices, missing files, truncated/corrupt PNG/JPEG/DICOM, 0-byte
and 1x1 files, huge-dimension headers and non-UTF-8 file names. Checks one well-formed reply
per line that expects one, nothing else on stdout, no ``internal`` code, and a live daemon at
the end. Counts per error code go to bench/RESULTS.md ("Fuzz run").
"""
from __future__ import annotations

import argparse
import collections
import io
import json
import os
import random
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.results import write_section  # noqa: E402
from daemon.errors import ERROR_CODES  # noqa: E402


def hostile_files(folder: Path) -> list[str]:
    """Broken and odd inputs on disk."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    good = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (120, 240), dtype=np.uint8)).save(good, "PNG")
    jpeg = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (120, 240), dtype=np.uint8)).save(jpeg, "JPEG")
    ihdr = struct.pack(">IIBBBBB", 60000, 60000, 8, 0, 0, 0, 0)
    huge = (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr
            + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)))
    files = {
        "zero.png": b"", "trunc.png": good.getvalue()[:300], "trunc.jpg": jpeg.getvalue()[:500],
        "noise.png": os.urandom(5000), "huge.png": huge, "fake.dcm": b"\0" * 128 + b"DICM" + os.urandom(400),
    }
    paths = []
    for name, data in files.items():
        (folder / name).write_bytes(data)
        paths.append(str(folder / name))
    Image.fromarray(np.zeros((1, 1), np.uint8)).save(folder / "one.png")
    odd = os.fsencode(folder) + b"/caf\xe9-\xff.png"
    with open(odd, "wb") as handle:
        handle.write(good.getvalue())
    return paths + [str(folder / "one.png"), os.fsdecode(odd), str(folder), "/dev/zero", "/dev/null",
                    str(folder / "missing.png"), "", " ", "../../../etc/passwd"]


def hostile_line(rng: random.Random, files: list[str], out: str) -> bytes:
    values = [None, True, 3, -1.5, "", "x" * 300, [], {}, [1, [2, [3]]], {"a": {"b": 1}}, 1e308] + files
    kind = rng.randrange(9)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))).replace(b"\n", b"")
    if kind == 1:
        text = json.dumps({"img_path": rng.choice(files), "destination_path": out})
        return text[: rng.randrange(1, len(text))].encode()
    if kind == 2:
        depth = rng.randrange(10, 5000)
        return (b"[" * depth + b"]" * depth) if rng.random() < 0.5 else b'{"a":' * depth + b"1" + b"}" * depth
    if kind == 3:
        return b""
    request = {"img_path": rng.choice(files), "destination_path": out}
    for field in rng.sample(["task", "id", "img_path", "destination_path", "explain", "op", "zzz"], rng.randrange(1, 4)):
        request[field] = rng.choice(values + ["osteo", "scar", "brixia", "handbone", "health", "gradcam"])
    if rng.random() < 0.1:
        request.pop("op", None)
        request["op"] = rng.choice(["health", "models", "nope"])
    return json.dumps(request).encode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=REPO / "weights")
    parser.add_argument("--lines", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="fuzz-"))
    files = hostile_files(work)
    # Run inside the scratch folder: fuzzed relative destinations must not land in the repository.
    proc = subprocess.Popen([sys.executable, str(REPO / "run_model.py"), str(args.weights.resolve()), "--device", "cpu"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=work)
    json.loads(proc.stdout.readline())
    codes: collections.Counter = collections.Counter()
    began = time.perf_counter()
    lines = [hostile_line(rng, files, str(work / "out")) for _ in range(args.lines)] + [b'{"img_path": "' + b"x" * (10 << 20) + b'"}']
    for line in lines:
        proc.stdin.write(line + b"\n")
        proc.stdin.flush()
        if not line.strip():
            continue
        reply = json.loads(proc.stdout.readline())  # a non-JSON line on stdout fails here
        assert reply["result"] in ("ok", "fail"), reply
        code = reply.get("error", {}).get("code", "ok" if reply["result"] == "ok" else None)
        assert code in ERROR_CODES + ("ok",), reply
        codes[code] += 1
    proc.stdin.write(b'{"op": "health"}\n')
    proc.stdin.flush()
    health = json.loads(proc.stdout.readline())
    proc.stdin.close()
    status = proc.wait(60)
    leftover = proc.stdout.read()
    seconds = time.perf_counter() - began
    table = "\n".join(f"| {code} | {count} |" for code, count in codes.most_common())
    body = f"""`python bench/fuzz_daemon.py --lines {args.lines} --seed {args.seed}`: {len(lines)} hostile lines in {seconds:.0f} s.
Health at the end: {health['result']}; exit status after EOF: {status}; stray stdout bytes: {len(leftover)}.
`internal` replies: {codes.get('internal', 0)}.

| reply | count |
|---|---|
{table}
"""
    print(body)
    write_section("Fuzz run", body)
    if codes.get("internal") or health["result"] != "ok" or status != 0 or leftover:
        sys.exit(1)


if __name__ == "__main__":
    main()
