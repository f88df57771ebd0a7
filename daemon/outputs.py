"""Where results go: destination checks, seed-style file names, and writes that never overwrite.

Files are named ``{basename}_{kind}_{%Y%m%d%H%M%S}{ext}`` as the osteo seed did; when that name
is taken, ``_1``, ``_2``... is appended instead of overwriting. Every file is written to a
temporary name in the same folder, flushed to disk, then linked to its final name, so a reader
(or a crash) never sees a half-written file under a final name.
"""
from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path

import cv2
import numpy as np

from daemon.errors import INTERNAL, INVALID_REQUEST, PATH_NOT_ALLOWED, ServiceError
from tasks.thread_pool import LazyThreadPool, usable_cores

MAX_SUFFIX = 10_000


def is_within(path: Path, root: Path) -> bool:
    """True when ``path`` (already resolved) is ``root`` or below it."""
    return path == root or root in path.parents


class Destination:
    """A request's destination folder: checked when the request is accepted, created only when its first
    file is written, so a request that fails leaves no empty folder behind."""

    def __init__(self, destination: str, output_root: Path | None) -> None:
        self.destination = destination
        self.path = check_destination(destination, output_root)

    def ready(self) -> Path:
        """The folder, created (with its parents) if it does not exist yet."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except PermissionError as exc:
            raise ServiceError(PATH_NOT_ALLOWED, f"cannot create destination_path {self.destination[:200]!r}: "
                                                 f"{exc.strerror}") from None
        except OSError as exc:  # e.g. a name longer than the file system allows
            raise ServiceError(INVALID_REQUEST, f"cannot create destination_path {self.destination[:200]!r}: "
                                                f"{exc.strerror}") from None
        return self.path


def check_destination(destination: str, output_root: Path | None) -> Path:
    """Resolve and confine the destination folder, and check that it can be written (or created),
    without creating anything; returns its absolute real path.

    With ``output_root`` set, the folder must lie inside it after resolving ``..`` and symlinks.
    """
    folder = Path(os.path.realpath(os.path.abspath(destination)))
    if output_root is not None and not is_within(folder, output_root):
        raise ServiceError(PATH_NOT_ALLOWED, f"destination_path {destination!r} is outside the output root "
                                             f"{str(output_root)!r}")
    try:
        return _writable_folder(folder, destination)
    except OSError as exc:  # e.g. a name longer than the file system allows
        raise ServiceError(INVALID_REQUEST, f"cannot create destination_path {destination[:200]!r}: "
                                            f"{exc.strerror}") from None


def _writable_folder(folder: Path, destination: str) -> Path:
    """``folder`` when it is a writable folder or mkdir could make it one; ServiceError saying why not."""
    if folder.exists():
        if not folder.is_dir():
            raise ServiceError(INVALID_REQUEST, f"destination_path {destination[:200]!r} exists and is not a folder")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ServiceError(PATH_NOT_ALLOWED, f"destination_path {destination!r} is not writable")
        return folder
    # What mkdir would meet, found now: the nearest existing ancestor, and names too long for the file system.
    ancestor = folder.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ServiceError(PATH_NOT_ALLOWED, f"cannot create destination_path {destination[:200]!r}: "
                                             f"{os.strerror(errno.EACCES)}")
    limit = os.pathconf(ancestor, "PC_NAME_MAX")
    if any(len(os.fsencode(part)) > limit for part in folder.relative_to(ancestor).parts):
        raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG))
    return folder


def timestamp(now: datetime | None = None) -> str:
    """The seed's file-name time stamp, local time to the second."""
    return (now or datetime.now()).strftime("%Y%m%d%H%M%S")


MAX_STEM_CHARS = 120  # leaves room for "_{kind}_{timestamp}_{N}.png" within a 255-byte file name


def output_stem(img_path: str) -> str:
    """The base name used for outputs: the input's file name without its extension (shortened
    so that the output name stays within the file system's limit)."""
    stem = Path(img_path).stem or "image"
    while len(os.fsencode(stem)) > MAX_STEM_CHARS:
        stem = stem[:-1]
    return stem


def _link_without_overwrite(tmp: str, folder: Path, stem: str, ext: str) -> Path:
    """Give ``tmp`` the first free name ``stem[_N]ext``; an existing file is never replaced."""
    for n in range(MAX_SUFFIX):
        final = folder / (f"{stem}{ext}" if n == 0 else f"{stem}_{n}{ext}")
        try:
            os.link(tmp, final)
            return final
        except FileExistsError:
            continue
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            # File systems without hard links: reserve the name exclusively, then move over it.
            try:
                os.close(os.open(final, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            except FileExistsError:
                continue
            os.replace(tmp, final)
            return final
    raise ServiceError(INTERNAL, f"no free output name for {stem}{ext} after {MAX_SUFFIX} tries")


def write_bytes(folder: Path | Destination, stem: str, ext: str, data: bytes) -> Path:
    """Write ``data`` atomically under a new name in ``folder`` (a request's Destination is created
    now, by its first file); returns the absolute final path."""
    if isinstance(folder, Destination):
        folder = folder.ready()
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{stem[:40]}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        return _link_without_overwrite(tmp, folder, stem, ext)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 image: (H, W) gray, (H, W, 3) RGB or (H, W, 4) RGBA."""
    if image.dtype != np.uint8:
        raise ValueError("encode_png expects uint8")
    if image.ndim == 3 and image.shape[2] == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_RGBA2BGRA)
    ok, buffer = cv2.imencode(".png", image)
    if not ok:
        raise ServiceError(INTERNAL, "PNG encoding failed")
    return buffer.tobytes()


_ENCODERS = 4  # at most this many PNGs of one request deflate side by side
_encoders = LazyThreadPool(lambda: min(usable_cores(), _ENCODERS), "png-encode")


Render = Callable[[], np.ndarray]


def encode_pngs(images: Sequence[np.ndarray | Render]) -> list[bytes]:
    """PNG bytes of several images, encoded side by side: OpenCV releases the GIL while it deflates,
    so a request's heat map and overlay cost about one encoding instead of two. An item may be a
    function that renders the image: it is called in the worker, so that no more images than there
    are workers are held at once (brixia's six full-size CAM overlays)."""
    if len(images) < 2:
        return [_encode_item(image) for image in images]
    return list(_encoders.get().map(_encode_item, images))


def _encode_item(item: np.ndarray | Render) -> bytes:
    return encode_png(item() if callable(item) else item)


def write_png(folder: Path | Destination, stem: str, image: np.ndarray) -> Path:
    """Encode and atomically write a PNG; returns its absolute path."""
    return write_bytes(folder, stem, ".png", encode_png(image))


def write_pngs(folder: Path | Destination, images: Mapping[str, np.ndarray | Render]) -> dict[str, Path]:
    """``write_png`` for several ``{stem: image or renderer}`` at once (encoded side by side, written in order)."""
    encoded = encode_pngs(list(images.values()))
    return {stem: write_bytes(folder, stem, ".png", data) for stem, data in zip(images, encoded)}
