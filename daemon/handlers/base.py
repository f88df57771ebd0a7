"""The lifecycle every task handler shares: validate -> preprocess -> infer(batch) -> postprocess.

The base owns the rules; a task's handler adds only what is its own. ``validate`` checks the
fields every task shares (and ``img_path`` / ``destination_path`` for the tasks that read
images and write files), then calls the task's ``validate_options``. ``preprocess`` works on
one request (decode + preprocessing, no model), ``infer`` on a batch of preprocessed requests
(the model and its explanations, each forward pass through ``forward``: autocast and the
float32 cast in one place), ``postprocess`` on one request again (files and reply fields), so
the server can batch and overlap work without the handler knowing. ``infer`` returns one
result per item: a value, or the exception that item raised (``raised``), which becomes that
request's fail reply. ``finish`` runs postprocess and, for a request with ``"dicom": true``,
writes the DICOM objects of what the task's ``dicom_content`` hands over (``daemon.dicom_out``),
then builds the reply. The destination folder is created by the first file written into it.
"""
from __future__ import annotations

import contextlib
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping

import numpy as np
import torch

from daemon.dicom_content import Content as DicomContent
from daemon.dicom_source import dicom_options
from daemon.errors import (FILE_NOT_FOUND, IMAGE_TOO_LARGE, INVALID_REQUEST, PATH_NOT_ALLOWED, UNREADABLE_IMAGE,
                           ServiceError)
from daemon.outputs import Destination, is_within, output_stem, timestamp
from daemon.protocol import reject_unknown_fields, require_string
from tasks import imaging
from tasks.bundle import Builder, Bundle, load_bundle
from tasks.cards import CARD_FILE

MIN_IMAGE_SIDE = 32
# fp16: float16 autocast on CUDA (float32 on CPU); fp32: never autocast. fp32 is the default: on an
# H200 the demo-size networks served 15-45 % slower under autocast (bench/RESULTS.md, "Precision").
PRECISIONS = ("fp32", "fp16")


def uses_amp(device: torch.device, precision: str = "fp32") -> bool:
    """Whether forward passes on ``device`` run under float16 autocast (``--precision fp16`` on CUDA)."""
    return precision == "fp16" and torch.device(device).type == "cuda"


def autocast_for(device: torch.device, precision: str = "fp32") -> contextlib.AbstractContextManager:
    """``torch.autocast("cuda", dtype=torch.float16)`` when ``uses_amp``, else a context that does nothing
    (CPU inference stays float32, bit for bit)."""
    if uses_amp(device, precision):
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def float32(value: Any) -> Any:
    """Floating tensors in ``value`` (a tensor, or tuples, lists and dicts of them) as float32; the rest as is."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, (list, tuple)):
        return type(value)(float32(item) for item in value)
    if isinstance(value, dict):
        return {key: float32(item) for key, item in value.items()}
    return value


def raised(step: Callable[..., Any], *args: Any) -> BaseException | None:
    """Run one item's ``step``; the exception it raised, or None. ``infer`` puts what it returns in
    that item's place, so a batch reports each item's failure rather than failing as a whole."""
    try:
        step(*args)
    except Exception as exc:
        return exc
    return None


@dataclass
class Settings:
    """Daemon-wide options a handler needs."""
    device: torch.device
    output_root: Path | None = None
    input_root: Path | None = None
    explain: str = "gradcam"
    max_pixels: int = imaging.DEFAULT_MAX_PIXELS
    fold: int | None = None
    precision: str = "fp32"  # one of PRECISIONS
    dicom: bool = False      # --dicom: requests write DICOM objects unless they say "dicom": false
    check_kind: bool = True  # --no-kind-check turns the image-kind gate off for every request


@dataclass
class Job:
    """One accepted task request on its way through the lifecycle."""
    task: str
    request: dict[str, Any]
    started: float = field(default_factory=time.perf_counter)
    options: dict[str, Any] = field(default_factory=dict)
    # What postprocess made that the DICOM objects reuse (masks, overlays, the file-name time stamp).
    artifacts: dict[str, Any] = field(default_factory=dict)


class TaskHandler:
    """Base class: owns the card, its bundle of fold networks and the reply's shape."""

    task: ClassVar[str] = ""
    # Request fields a task accepts beyond ``task`` and ``id``.
    fields: ClassVar[frozenset[str]] = frozenset()
    # Reply fields that come right after ``result`` (the osteo seed's order), before ``task``.
    leading_fields: ClassVar[tuple[str, ...]] = ()
    # The image-kind gate (daemon.kind_gate.KindGate) the registry hands every handler; None: no gate.
    kind_gate: Any = None

    # How the card's networks are built: one builder for a one-model card, or {model: builder}
    # (tasks.bundle); ``required_models``: the models a card of this task must have.
    builders: ClassVar[Builder | Mapping[str, Builder] | None] = None
    required_models: ClassVar[tuple[str, ...]] = ()
    # The layout the loaded networks' weights are put in (and the handler gives its image batches):
    # oneDNN's convolutions are ~30 % faster channels-last on a CPU (bench/RESULTS.md, "Fast path").
    memory_format: ClassVar[torch.memory_format] = torch.contiguous_format

    def __init__(self, card: dict[str, Any], bundle: Bundle, settings: Settings, source: str) -> None:
        self.card = card
        self.bundle = bundle
        self.settings = settings
        self.source = source

    @property
    def networks(self) -> list[torch.nn.Module]:
        """The fold networks of a one-model card (``self.bundle[model]`` for a card with several)."""
        return self.bundle.only()

    @classmethod
    def prepare_network(cls, model: str, network: torch.nn.Module) -> None:
        """Hook run on each loaded network (e.g. freeze what Grad-CAM does not need)."""

    @classmethod
    def check_bundle(cls, bundle: Bundle) -> None:
        """Hook: raise CardError when the loaded card cannot serve this task (e.g. scar's scalers)."""

    @classmethod
    def load(cls, folder: Path, settings: Settings) -> "TaskHandler":
        """The handler of the card in ``folder``: its networks (sha256 checked, ``--fold`` applied) on the
        handler's device, prepared and checked."""
        bundle = load_bundle(folder, cls.builders, settings.device, settings.fold, required=cls.required_models)
        return cls.from_bundle(bundle, settings, str(Path(folder) / CARD_FILE))

    @classmethod
    def from_bundle(cls, bundle: Bundle, settings: Settings, source: str) -> "TaskHandler":
        for model, networks in bundle.networks.items():
            for network in networks:
                cls.prepare_network(model, network)
                network.to(memory_format=cls.memory_format)
        cls.check_bundle(bundle)
        return cls(bundle.card, bundle, settings, source)

    @property
    def model_info(self) -> dict[str, Any]:
        """The ``model`` field of every reply."""
        return {"name": self.card["name"], "version": self.card["version"], "demo": bool(self.card.get("demo", False))}

    @property
    def amp(self) -> bool:
        """True when this handler's forward passes run in float16 autocast (CUDA, ``--precision fp16``)."""
        return uses_amp(self.settings.device, self.settings.precision)

    def autocast(self) -> contextlib.AbstractContextManager:
        """float16 autocast on CUDA with ``--precision fp16``, nothing at all otherwise (CPU results are
        unchanged). ``forward`` runs in it; so do Grad-CAM (``explain.grad_cam``) and saliency, which
        cast activations and gradients to float32 before building maps."""
        return autocast_for(self.settings.device, self.settings.precision)

    def forward(self, step: Callable[..., Any], *args: Any, grad: bool = False) -> Any:
        """``step(*args)`` (a network, or a task function over networks) under this handler's autocast,
        in inference mode unless ``grad``, with floating outputs cast to float32: what every forward pass
        of ``infer`` goes through, so softmax, sigmoid and thresholds always see float32."""
        with (torch.enable_grad() if grad else torch.inference_mode()), self.autocast():
            return float32(step(*args))

    def dummy_inputs(self) -> list[Any]:
        """Preprocessed stand-ins for requests (blank frames of the card's input size), one per model path
        that ``warm_up`` should run."""
        return []

    def warm_up(self) -> None:
        """Run ``infer`` once on each of ``dummy_inputs`` at start-up, so that lazy imports and first-call
        allocations do not land on the first request (grad-cam's import alone costs seconds)."""
        for prepared in self.dummy_inputs():
            self.infer([prepared])

    # --- the four steps -------------------------------------------------------------------
    # The request's image: required, or optional (scar: clinical features alone are a request).
    image_optional: ClassVar[bool] = False

    def validate(self, request: dict[str, Any]) -> Job:
        """Check the request's fields; raise ServiceError(invalid_request) naming what is wrong. A task
        that reads images also takes ``check_kind`` (default true: the image-kind gate runs) and needs
        ``img_path``; a task that writes files needs ``destination_path`` when it will write (an image,
        or DICOM asked for), checked against ``--output-root`` here and created by the first file written.
        Then the task's own ``validate_options``."""
        reads_images = "img_path" in self.fields
        reject_unknown_fields(request, self.fields | {"task", "id", "dicom", "dicom_context"}
                              | ({"check_kind"} if reads_images else set()))
        job = Job(task=self.task, request=request)
        job.options["dicom"] = dicom_options(request, self.settings.dicom)
        if reads_images:
            check = request.get("check_kind", True)
            if not isinstance(check, bool):
                raise ServiceError(INVALID_REQUEST, f"'check_kind' must be true or false (got {check!r})")
            job.options["check_kind"] = check
            job.options["img_path"] = require_string(request, "img_path", optional=self.image_optional)
        if "destination_path" in self.fields:
            if job.options.get("img_path") is not None or job.options["dicom"] is not None:
                job.options["destination_path"] = require_string(request, "destination_path")
                job.options["folder"] = Destination(job.options["destination_path"], self.settings.output_root)
            else:
                require_string(request, "destination_path", optional=True)  # accepted, unused: no files to write
        self.validate_options(request, job)
        return job

    def validate_options(self, request: dict[str, Any], job: Job) -> None:
        """Hook: check the task's own request fields into ``job.options``; raise ServiceError naming what is wrong."""

    def preprocess(self, job: Job) -> Any:
        raise NotImplementedError

    def infer(self, batch: list[Any]) -> list[Any]:
        """One result per item of ``batch``: a value for ``postprocess``, or the exception that item raised."""
        raise NotImplementedError

    def postprocess(self, job: Job, prepared: Any, inferred: Any) -> dict[str, Any]:
        raise NotImplementedError

    def dicom_content(self, job: Job, fields: dict[str, Any]) -> DicomContent:
        """What of this request's results goes into DICOM objects (masks, numbers, findings,
        overlays), from ``fields`` (postprocess's reply fields) and ``job.artifacts``."""
        raise NotImplementedError

    def finish(self, job: Job, prepared: Any, inferred: Any) -> dict[str, Any]:
        """postprocess, then the DICOM objects when the request asks for them, then the reply. A
        postprocess that fails writes no DICOM."""
        fields = self.postprocess(job, prepared, inferred)
        if job.options.get("dicom") is not None:
            fields.update(self.write_dicom(job, fields))
        return self.reply(job, fields)

    def write_dicom(self, job: Job, fields: dict[str, Any]) -> dict[str, Any]:
        """Write the request's DICOM objects; the reply's ``dicom_paths`` (and ``dicom_note``)."""
        from daemon import dicom_out  # highdicom: loaded by the first request that asks for DICOM

        header, image = job.options.get("dicom_input", (None, None))
        img_path = job.options.get("img_path")
        return dicom_out.write_for_request(job.options["folder"], output_stem(img_path) if img_path else self.task,
                                           job.artifacts.get("stamp") or timestamp(), header, image,
                                           job.options["dicom"], self.dicom_content(job, fields), self.model_info)

    # --- shared helpers -------------------------------------------------------------------
    def read_request_image(self, job: Job, color: str = "gray") -> np.ndarray:
        """The request's ``img_path`` decoded once, checked by the image-kind gate (unless the daemon or
        the request turned it off), and returned as ``color``; ServiceError(wrong_image_kind) when the
        image is confidently not of this task's kind. When the job asks for DICOM, the image and its
        DICOM header (None for other formats) are kept in it for the objects to reference."""
        decoded = self.decode_input(job.options["img_path"])
        if self.kind_gate is not None and self.settings.check_kind and job.options.get("check_kind", True):
            self.kind_gate.check(self.task, decoded)
        image = decoded.as_color(color)
        if job.options.get("dicom") is not None:
            job.options["dicom_input"] = (decoded.header, image)
        return image

    def read_input(self, img_path: str, color: str = "gray") -> np.ndarray:
        """Read an input image through the one reader, with the daemon's size cap and error codes."""
        return self.decode_input(img_path).as_color(color)

    def decode_input(self, img_path: str) -> imaging.DecodedImage:
        """Decode an input image (pixels in their own colour, DICOM kind attributes and header) through
        the one reader, with the daemon's size cap and error codes."""
        path = os.path.abspath(img_path)
        root = self.settings.input_root
        if root is not None and not is_within(Path(os.path.realpath(path)), root):
            raise ServiceError(PATH_NOT_ALLOWED, f"img_path {img_path!r} is outside the input root {str(root)!r}")
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            raise ServiceError(FILE_NOT_FOUND, f"img_path {img_path!r} does not exist") from None
        except OSError as exc:
            raise ServiceError(FILE_NOT_FOUND, f"img_path {img_path!r} cannot be accessed: {exc.strerror}") from None
        if stat.S_ISDIR(mode):
            raise ServiceError(FILE_NOT_FOUND, f"img_path {img_path!r} is a folder, not an image file")
        try:
            image = imaging.decode_image(path, max_pixels=self.settings.max_pixels)
        except imaging.ImageTooLarge as exc:
            raise ServiceError(IMAGE_TOO_LARGE, str(exc)) from None
        except imaging.ImageReadError as exc:
            raise ServiceError(UNREADABLE_IMAGE, str(exc)) from None
        except FileNotFoundError:
            raise ServiceError(FILE_NOT_FOUND, f"img_path {img_path!r} does not exist") from None
        except PermissionError:
            raise ServiceError(FILE_NOT_FOUND, f"img_path {img_path!r} is not readable (permission denied)") from None
        height, width = image.pixels.shape[:2]
        if min(height, width) < MIN_IMAGE_SIDE:
            raise ServiceError(UNREADABLE_IMAGE, f"image is {width}x{height} pixels; "
                                                 f"at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} is needed")
        return image

    def reply(self, job: Job, fields: dict[str, Any]) -> dict[str, Any]:
        """Assemble an ok reply: result, leading fields, task, id, the rest, model, elapsed_ms."""
        reply: dict[str, Any] = {"result": "ok"}
        reply.update({key: fields[key] for key in self.leading_fields})
        reply["task"] = self.task
        if "id" in job.request:
            reply["id"] = job.request["id"]
        reply.update({key: value for key, value in fields.items() if key not in self.leading_fields})
        reply["model"] = self.model_info
        reply["elapsed_ms"] = round((time.perf_counter() - job.started) * 1000, 1)
        return reply
