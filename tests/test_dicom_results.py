"""Results back into the PACS: ``"dicom": true`` writes a Segmentation, a measurement report and
Secondary Captures that read back to the reply's masks and numbers, pass dciodvfy, reference their
source, and are filed by a real Orthanc under the source's study.

One daemon on the committed demo weights and one Orthanc serve the whole module; the requests
run once (``replies``) and each test reads what it needs from them.
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import (ComputedRadiographyImageStorage, EnhancedSRStorage, SecondaryCaptureImageStorage,
                         SegmentationStorage, generate_uid)

from conftest import REPO, Daemon
from dicom_factory import write_dicom
from pacs import Orthanc, dciodvfy
from tasks.imaging import read_image

CLINICAL = {"age": 43, "sex": 0, "BMI": 24.9, "Delta_date": 287, "smoking": 0, "diabetes": 0, "hypertension": 0,
            "keloid_history": 0, "wound_infection": 0, "drain": 1, "thyroiditis": 0}
HAND_STUDY = generate_uid()
HAND_CONTEXT = {"patient_id": "H-17", "patient_name": "Doe^Jane", "patient_sex": "F", "patient_birth_date": "19700101",
                "study_instance_uid": HAND_STUDY, "accession_number": "ACC17", "study_date": "20261130",
                "study_time": "101500", "study_description": "Hand XR"}
SCAR_CONTEXT = {"patient_id": "S-4", "patient_name": "Müller^Hans"}


@pytest.fixture(scope="module")
def daemon():
    started = Daemon(str(REPO / "weights"))
    yield started
    started.close()


@pytest.fixture(scope="module")
def osteo_dicom(tmp_path_factory) -> Path:
    """The osteo example as an 8-bit DICOM panoramic."""
    gray = np.asarray(Image.open(REPO / "examples" / "osteo_c3.png").convert("L"))
    return Path(write_dicom(tmp_path_factory.mktemp("inputs") / "pano.dcm", gray))


@pytest.fixture(scope="module")
def replies(daemon, osteo_dicom, tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    examples = REPO / "examples"
    requests = {
        "brixia": {"task": "brixia", "img_path": str(examples / "brixia_chest_000001.dcm"), "cams": False},
        "handbone": {"task": "handbone", "img_path": str(examples / "handbone_hand.png"), "dicom_context": HAND_CONTEXT},
        "osteo_dicom": {"task": "osteo", "img_path": str(osteo_dicom)},
        "osteo_png": {"task": "osteo", "img_path": str(examples / "osteo_c3.png")},
        "scar_photo": {"task": "scar", "img_path": str(examples / "scar_neck.jpg"), "clinical": CLINICAL,
                       "dicom_context": SCAR_CONTEXT},
        "scar_clinical": {"task": "scar", "clinical": CLINICAL, "dicom_context": SCAR_CONTEXT},
    }
    answered = {}
    for name, request in requests.items():
        reply = daemon.ask({**request, "id": name, "dicom": True, "destination_path": str(out / name)})
        assert reply["result"] == "ok", reply
        answered[name] = reply
    return answered


def read(path: str) -> pydicom.Dataset:
    return pydicom.dcmread(path)


def all_paths(reply: dict) -> list[str]:
    paths = reply["dicom_paths"]
    return [paths[kind] for kind in ("source", "seg", "sr") if kind in paths] + paths.get("sc", [])


def report_values(path: str) -> tuple[dict[str, float], dict[str, str], hd.sr.MeasurementsAndQualitativeEvaluations]:
    """(measurement meaning -> value, finding code -> meaning, the group) of a TID 1500 report."""
    (group,) = hd.sr.srread(path).content.get_image_measurement_groups()
    numbers = {item.name.meaning: item.value for item in group.get_measurements()}
    findings = {item.value.value: item.value.meaning for item in group.get_qualitative_evaluations()}
    return numbers, findings, group


def algorithm_record(sr: pydicom.Dataset) -> dict[str, object]:
    """The report's Algorithm Identification (TID 4019): name, version and parameters as written."""
    record: dict[str, object] = {}
    stack = list(sr.ContentSequence)
    while stack:
        item = stack.pop(0)
        meaning = item.ConceptNameCodeSequence[0].CodeMeaning
        if meaning in ("Algorithm Name", "Algorithm Version"):
            record[meaning] = item.TextValue
        elif meaning == "Algorithm Parameters":
            record.setdefault(meaning, []).append(item.TextValue)
        stack.extend(item.get("ContentSequence", []))
    return record


def segment_masks(path: str, source_uid: str) -> dict[str, np.ndarray]:
    """Segment label -> (H, W) bool, read back with highdicom for the source instance."""
    seg = hd.seg.segread(path)
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=[source_uid], combine_segments=False)[0]
    labels = [item.SegmentLabel for item in seg.SegmentSequence]
    return {label: pixels[..., k].astype(bool) for k, label in enumerate(labels)}


def assert_derived_from(dataset: pydicom.Dataset, source: pydicom.Dataset, model: dict) -> None:
    """Same patient and study as the source, a series of its own, the model and its demo flag named."""
    assert dataset.StudyInstanceUID == source.StudyInstanceUID
    assert dataset.SeriesInstanceUID != source.SeriesInstanceUID
    assert dataset.PatientID == source.PatientID and dataset.PatientName == source.PatientName
    assert dataset.SeriesDescription.startswith("DEMO ") and model["name"] in dataset.SeriesDescription
    assert f"{model['name']} {model['version']}" in dataset.SoftwareVersions
    assert dataset.Manufacturer == "medimg-daemon"


def test_brixia_film_gives_lung_heart_segmentation_score_report_and_overlay(replies):
    reply = replies["brixia"]
    paths = reply["dicom_paths"]
    assert set(paths) == {"seg", "sr", "sc"} and len(paths["sc"]) == 1 and "dicom_note" not in reply
    source = pydicom.dcmread(REPO / "examples" / "brixia_chest_000001.dcm", stop_before_pixels=True)
    for path in all_paths(reply):
        assert Path(path).name.startswith("brixia_chest_000001_") and path.endswith(".dcm")
        assert_derived_from(read(path), source, reply["model"])

    labels = np.asarray(Image.open(reply["mask_img_path"]))     # 1 right lung, 2 left lung, 3 heart on top
    masks = segment_masks(paths["seg"], source.SOPInstanceUID)
    assert list(masks) == ["right lung", "left lung", "heart"]
    assert masks["right lung"].shape == (source.Rows, source.Columns)
    assert np.array_equal(masks["heart"], labels == 3)
    assert np.array_equal(masks["right lung"] & ~masks["heart"], labels == 1)
    assert np.array_equal(masks["left lung"] & ~masks["heart"], labels == 2)
    seg = read(paths["seg"])
    assert seg.SOPClassUID == SegmentationStorage and seg.SegmentationType == "BINARY"
    assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == (reply["model"]["name"], reply["model"]["version"])
    assert "demo=true" in algorithm.AlgorithmParameters

    numbers, _, group = report_values(paths["sr"])
    expected = {f"Brixia score, region {r} ({where})": s for (r, s), where in zip(
        reply["region_scores"].items(), ("upper right", "middle right", "lower right", "upper left", "middle left",
                                         "lower left"))}
    assert numbers == {**expected, "Brixia global score": reply["global_score"]}
    assert group.source_images[0].referenced_sop_instance_uid == source.SOPInstanceUID
    sr = read(paths["sr"])
    assert algorithm_record(sr)["Algorithm Parameters"] == ["demo=true", f"alignment={reply['alignment']}"]
    assert sr.SOPClassUID == EnhancedSRStorage and sr.VerificationFlag == "UNVERIFIED"
    assert sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0] \
        .ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID

    sc = read(paths["sc"][0])
    assert sc.SOPClassUID == SecondaryCaptureImageStorage and sc.SourceImageSequence[0].ReferencedSOPInstanceUID \
        == source.SOPInstanceUID
    assert np.array_equal(sc.pixel_array, np.asarray(Image.open(reply["overlay_img_path"]).convert("RGB")))


def test_hand_png_gives_29_named_segments_in_the_context_study(replies):
    reply = replies["handbone"]
    paths = reply["dicom_paths"]
    assert set(paths) == {"source", "seg"}
    assert "dicom_paths.source" in reply["dicom_note"] and "new study" not in reply["dicom_note"]
    source = read(paths["source"])
    assert source.SOPClassUID == SecondaryCaptureImageStorage
    assert np.array_equal(source.pixel_array, np.asarray(Image.open(REPO / "examples" / "handbone_hand.png")))
    for dataset in (source, read(paths["seg"])):
        assert dataset.StudyInstanceUID == HAND_STUDY
        assert (dataset.PatientID, str(dataset.PatientName), dataset.PatientSex, dataset.PatientBirthDate) == \
            ("H-17", "Doe^Jane", "F", "19700101")
        assert (dataset.AccessionNumber, dataset.StudyDate, dataset.StudyTime) == ("ACC17", "20261130", "101500")
        assert dataset.StudyDescription == "Hand XR"
    masks = segment_masks(paths["seg"], source.SOPInstanceUID)
    expected = np.load(reply["masks_path"])
    assert list(masks) == list(expected.keys()) and len(masks) == 29
    for name, mask in masks.items():
        assert np.array_equal(mask, expected[name]), name
        assert int(mask.sum()) == reply["areas_px"][name]


def test_osteo_dicom_gives_a_diagnosis_report_and_heat_map_overlay_that_reference_it(replies, osteo_dicom):
    reply = replies["osteo_dicom"]
    paths = reply["dicom_paths"]
    assert set(paths) == {"sr", "sc"} and "dicom_note" not in reply
    source = pydicom.dcmread(osteo_dicom, stop_before_pixels=True)
    for path in all_paths(reply):
        assert_derived_from(read(path), source, reply["model"])
    numbers, findings, group = report_values(paths["sr"])
    assert findings == {reply["label"]: reply["diagnosis"]}
    assert numbers == {f"Probability of C3 (Patient with Osteoporosis)": reply["probability"]}
    assert group.source_images[0].referenced_sop_instance_uid == source.SOPInstanceUID
    assert algorithm_record(read(paths["sr"])) == {"Algorithm Name": reply["model"]["name"],
                                                   "Algorithm Version": reply["model"]["version"],
                                                   "Algorithm Parameters": ["demo=true", "explain=gradcam"]}
    sc = read(paths["sc"][0])
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert np.array_equal(sc.pixel_array, np.asarray(Image.open(reply["overlay_img_path"]).convert("RGB")))


def test_a_png_without_context_goes_into_a_new_study_and_the_reply_says_so(replies):
    reply = replies["osteo_png"]
    assert set(reply["dicom_paths"]) == {"source", "sr", "sc"}
    assert "new study (new Study Instance UID)" in reply["dicom_note"]
    datasets = [read(path) for path in all_paths(reply)]
    assert len({d.StudyInstanceUID for d in datasets}) == 1 and len({d.SeriesInstanceUID for d in datasets}) == 3
    assert datasets[0].PatientID == "" and datasets[0].StudyDate  # a new study is dated when it is made
    assert replies["osteo_dicom"]["probability"] == reply["probability"]  # the same pixels, DICOM or PNG


def test_scar_reports_severity_and_probabilities_with_and_without_a_photo(replies):
    photo, clinical = replies["scar_photo"], replies["scar_clinical"]
    assert set(photo["dicom_paths"]) == {"source", "sr", "sc"} and set(clinical["dicom_paths"]) == {"sr"}
    for reply in (photo, clinical):
        numbers, _, group = report_values(reply["dicom_paths"]["sr"])
        assert numbers == {"Scar severity grade (0-3)": reply["severity"],
                           **{f"Probability of scar severity grade {k}": p for k, p in enumerate(reply["probabilities"])}}
        sr = read(reply["dicom_paths"]["sr"])
        assert (sr.PatientID, str(sr.PatientName), sr.SpecificCharacterSet) == ("S-4", "Müller^Hans", "ISO_IR 192")
        assert "dicom_context has no study_instance_uid" in reply["dicom_note"]
    assert "CurrentRequestedProcedureEvidenceSequence" not in read(clinical["dicom_paths"]["sr"])  # from no image
    source = read(photo["dicom_paths"]["source"])
    assert source.PhotometricInterpretation == "RGB"
    assert np.array_equal(source.pixel_array, read_image(REPO / "examples" / "scar_neck.jpg", color="rgb"))
    sc = read(photo["dicom_paths"]["sc"][0])
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert np.array_equal(sc.pixel_array, np.asarray(Image.open(photo["overlay_img_path"])))


def test_every_object_passes_dciodvfy(replies):
    for name, reply in replies.items():
        for path in all_paths(reply):
            errors, report = dciodvfy(path)
            assert not errors, f"{name}: {path}\n{report}"


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    pacs = Orthanc(tmp_path_factory.mktemp("orthanc"))
    yield pacs
    pacs.close()


def test_orthanc_files_each_result_under_its_source_study(replies, orthanc, osteo_dicom):
    cases = {  # request -> (source file to store first, or None when the objects bring theirs; series expected)
        "brixia": (REPO / "examples" / "brixia_chest_000001.dcm",
                   {("CR", ComputedRadiographyImageStorage), ("SEG", SegmentationStorage), ("SR", EnhancedSRStorage),
                    ("OT", SecondaryCaptureImageStorage)}),
        "osteo_dicom": (osteo_dicom, {("OT", SecondaryCaptureImageStorage), ("SR", EnhancedSRStorage)}),
        "handbone": (None, {("OT", SecondaryCaptureImageStorage), ("SEG", SegmentationStorage)}),
    }
    for name, (source_file, expected) in cases.items():
        files = ([source_file] if source_file else []) + all_paths(replies[name])
        stored = [orthanc.store(path) for path in files]
        assert {answer["Status"] for answer in stored} == {"Success"}, stored
        (study_id,) = {answer["ParentStudy"] for answer in stored}
        study = orthanc.get(f"/studies/{study_id}")
        source = read(str(source_file or replies[name]["dicom_paths"]["source"]))
        assert study["MainDicomTags"]["StudyInstanceUID"] == source.StudyInstanceUID
        series = orthanc.study_contents(study_id)
        assert len(series) == len(files)   # the source's series, and one new series per object
        assert {(s["modality"], sop) for s in series for sop in s["sop_classes"]} == expected
        stored_uids = {uid for s in series for uid in s["sop_uids"]}
        assert stored_uids == {read(str(path)).SOPInstanceUID for path in files}
    assert len(orthanc.get("/studies")) == 3


def test_a_failed_request_writes_no_dicom(daemon, tmp_path):
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((256, 256), 128, np.uint8)).save(blank)
    out = tmp_path / "out"
    missing = daemon.ask({"task": "handbone", "img_path": str(tmp_path / "nope.png"), "destination_path": str(out),
                          "dicom": True})
    no_lungs = daemon.ask({"task": "brixia", "img_path": str(blank), "destination_path": str(out), "dicom": True})
    assert missing["error"]["code"] == "file_not_found" and no_lungs["result"] == "fail"
    assert not list(out.rglob("*.dcm")) and not list(out.rglob("*.part"))
    assert daemon.ask({"op": "health"})["result"] == "ok"


@pytest.mark.parametrize("fields, named", [
    ({"dicom": "yes"}, "'dicom'"),
    ({"dicom_context": {"patient_id": "P"}}, "add \"dicom\": true"),
    ({"dicom": True, "dicom_context": ["P"]}, "'dicom_context'"),
    ({"dicom": True, "dicom_context": {"patient": "P"}}, "dicom_context.patient"),
    ({"dicom": True, "dicom_context": {"patient_id": 17}}, "'dicom_context.patient_id'"),
    ({"dicom": True, "dicom_context": {"patient_id": "x" * 65}}, "'dicom_context.patient_id'"),
    ({"dicom": True, "dicom_context": {"patient_sex": "female"}}, "'dicom_context.patient_sex'"),
    ({"dicom": True, "dicom_context": {"study_date": "2026-11-30"}}, "'dicom_context.study_date'"),
    ({"dicom": True, "dicom_context": {"study_date": "20261340"}}, "'dicom_context.study_date'"),
    ({"dicom": True, "dicom_context": {"study_time": "251500"}}, "'dicom_context.study_time'"),
    ({"dicom": True, "dicom_context": {"study_instance_uid": "1.2.03"}}, "'dicom_context.study_instance_uid'"),
    ({"dicom": True, "dicom_context": {"patient_name": "A^B^C^D^E^F"}}, "'dicom_context.patient_name'"),
    ({"dicom": True, "dicom_context": {"accession_number": "A\\B"}}, "'dicom_context.accession_number'"),
])
def test_a_broken_dicom_context_is_an_invalid_request_naming_the_field(daemon, tmp_path, fields, named):
    reply = daemon.ask({"task": "osteo", "id": 5, "img_path": str(REPO / "examples" / "osteo_c1.png"),
                        "destination_path": str(tmp_path), **fields})
    assert reply["result"] == "fail" and reply["error"]["code"] == "invalid_request", reply
    assert named in reply["error"]["message"] and reply["id"] == 5
    assert not list(tmp_path.iterdir())
    assert daemon.ask({"op": "health"})["result"] == "ok"


def test_objects_are_written_whole_or_not_at_all_and_never_over_another(tmp_path, monkeypatch):
    from daemon import dicom_out, outputs
    from daemon.dicom_content import Content, Number, PROBABILITY
    from daemon.dicom_source import DicomRequest

    gray = np.zeros((64, 64), np.uint8)
    model = {"name": "unit", "version": "1", "demo": False}
    content = Content(numbers=[Number("P", "Probability", 0.5, PROBABILITY)], overlays=[np.zeros((64, 64, 3), np.uint8)])
    first, second = (dicom_out.write_for_request(tmp_path, "x", "20260101000000", None, gray, DicomRequest(), content,
                                                 model)["dicom_paths"] for _ in range(2))
    assert Path(first["sr"]).name == "x_sr_20260101000000.dcm" and Path(second["sr"]).name == "x_sr_20260101000000_1.dcm"
    assert read(first["sr"]).SOPInstanceUID != read(second["sr"]).SOPInstanceUID
    assert not read(first["sr"]).SeriesDescription.startswith("DEMO")

    calls = []

    def fail_on_the_third(folder, stem, ext, data):
        calls.append(stem)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return outputs.write_bytes(folder, stem, ext, data)

    before = sorted(tmp_path.iterdir())
    monkeypatch.setattr(dicom_out, "write_bytes", fail_on_the_third)
    with pytest.raises(OSError):
        dicom_out.write_for_request(tmp_path, "y", "20260101000000", None, gray, DicomRequest(), content, model)
    assert len(calls) == 3 and sorted(tmp_path.iterdir()) == before   # the two written are gone, no .part left


@pytest.mark.parametrize("layout, said", [
    ("ct-without-pixel-spacing", "cannot be derived from (AttributeError"),
])
def test_a_dicom_input_that_cannot_be_referenced_is_captured_in_its_own_study(tmp_path, layout, said):
    from daemon import dicom_out
    from daemon.dicom_content import Content, Segment
    from daemon.dicom_source import DicomRequest
    from dicom_factory import dataset_from_pixels, save
    from pydicom.sr.codedict import codes
    from pydicom.uid import CTImageStorage
    from tasks.imaging import decode_image

    pixels = np.zeros((3, 64, 80), np.uint8)
    pixels[:, 10:30, 10:40] = 200
    # a slice that places itself in space but does not give its pixel spacing
    film = dataset_from_pixels(pixels[0])
    film.SOPClassUID, film.Modality, film.FrameOfReferenceUID = CTImageStorage, "CT", generate_uid()
    film.ImageOrientationPatient, film.ImagePositionPatient = [1, 0, 0, 0, 1, 0], [0, 0, 0]
    save(film, tmp_path / "film.dcm")
    decoded = decode_image(tmp_path / "film.dcm")
    image, header = decoded.as_color("gray"), decoded.header
    content = Content(segments=[Segment("bright", image > 100, codes.SCT.Bone)])
    reply = dicom_out.write_for_request(tmp_path, "film", "20260101000000", header, image, DicomRequest(), content,
                                        {"name": "unit", "version": "1", "demo": True})
    assert set(reply["dicom_paths"]) == {"source", "seg"} and said in reply["dicom_note"]
    source, seg = read(reply["dicom_paths"]["source"]), read(reply["dicom_paths"]["seg"])
    assert source.StudyInstanceUID == seg.StudyInstanceUID == film.StudyInstanceUID
    assert str(source.PatientName) == "Phantom^Test" and np.array_equal(source.pixel_array, image)
    assert np.array_equal(segment_masks(reply["dicom_paths"]["seg"], source.SOPInstanceUID)["bright"], image > 100)
    for path in reply["dicom_paths"].values():
        errors, report = dciodvfy(path)
        assert not errors, report


def test_batch_dicom_writes_objects_for_every_request_that_does_not_refuse_them(tmp_path):
    hand = str(REPO / "examples" / "handbone_hand.png")
    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps({"task": "handbone", "img_path": hand}) + "\n"
                        + json.dumps({"task": "handbone", "img_path": hand, "dicom": False}) + "\n")
    run = subprocess.run([sys.executable, "-m", "daemon.batch", str(REPO / "weights"), str(requests), "--out",
                          str(tmp_path / "out"), "--dicom", "--no-progress", "--", "--tasks", "handbone"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    with open(tmp_path / "out" / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    with_dicom, without = (json.loads(row["paths"]) for row in rows)
    assert set(with_dicom["dicom_paths"]) == {"source", "seg"} and "dicom_paths" not in without
    assert len(list((tmp_path / "out").glob("*.dcm"))) == 2
