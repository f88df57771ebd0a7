"""Test helpers for DICOM results: dicom3tools' ``dciodvfy`` and a throw-away Orthanc PACS.

Orthanc runs with its own JSON config (no plugins, no DICOM listener, HTTP on a free port, local
requests only) and a storage folder of the test's, and is stopped when the test module ends.
Both programs come from Debian packages; without them the tests that need them are skipped with
a message that says what to install.
"""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

DCIODVFY = shutil.which("dciodvfy")
ORTHANC = shutil.which("Orthanc")
NEED_DCIODVFY = "dciodvfy not found: install Debian's dicom3tools (apt-get install dicom3tools) to validate DICOM"
NEED_ORTHANC = "Orthanc not found: install Debian's orthanc (apt-get install orthanc) for the PACS round trip"


def dciodvfy(path: str | Path) -> tuple[list[str], str]:
    """(error lines, whole report) of dicom3tools' IOD validator on one file."""
    if DCIODVFY is None:
        pytest.skip(NEED_DCIODVFY)
    run = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=120)
    report = run.stdout + run.stderr
    return [line for line in report.splitlines() if line.startswith("Error")], report


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Orthanc:
    """One Orthanc process and its REST API at http://127.0.0.1:PORT."""

    def __init__(self, folder: Path, timeout: float = 60) -> None:
        if ORTHANC is None:
            pytest.skip(NEED_ORTHANC)
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        storage = folder / "storage"
        config = {"Name": "medimg-tests", "StorageDirectory": str(storage), "IndexDirectory": str(storage),
                  "HttpPort": self.port, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
                  "DicomServerEnabled": False, "Plugins": [], "HttpThreadsCount": 4, "SaveJobs": False,
                  "StorageCompression": False, "HttpDescribeErrors": True}
        (folder / "orthanc.json").write_text(json.dumps(config, indent=1))
        self.log = folder / "orthanc.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([ORTHANC, str(folder / "orthanc.json")], cwd=folder, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.system = self.get("/system")
                return
            except (urllib.error.URLError, ConnectionError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.close()
                    raise RuntimeError(f"Orthanc did not start: {self.log.read_text()[-2000:]}") from None
                time.sleep(0.2)

    def _call(self, path: str, data: bytes | None = None) -> Any:
        request = urllib.request.Request(self.url + path, data=data, method="POST" if data is not None else "GET",
                                         headers={"Content-Type": "application/dicom"} if data is not None else {})
        with urllib.request.urlopen(request, timeout=30) as response:
            body = response.read()
        try:
            return json.loads(body)
        except ValueError:
            return body.decode("utf-8", "replace")

    def get(self, path: str) -> Any:
        return self._call(path)

    def store(self, path: str | Path) -> dict[str, Any]:
        """POST one DICOM file to /instances; Orthanc's answer (ID, ParentStudy, Status ...)."""
        return self._call("/instances", Path(path).read_bytes())

    def study_contents(self, study_id: str) -> list[dict[str, Any]]:
        """Every series of a study: its modality, Series Instance UID and its instances' SOP classes and UIDs."""
        contents = []
        for series in self.get(f"/studies/{study_id}/series"):
            instances = [self.get(f"/instances/{orthanc_id}/simplified-tags") for orthanc_id in series["Instances"]]
            contents.append({"modality": series["MainDicomTags"].get("Modality"),
                             "series_uid": series["MainDicomTags"]["SeriesInstanceUID"],
                             "sop_classes": sorted({tags["SOPClassUID"] for tags in instances}),
                             "sop_uids": sorted(tags["SOPInstanceUID"] for tags in instances)})
        return contents

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
