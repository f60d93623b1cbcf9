"""Checkpoint resolution: official names, fsspec URLs (cached once), Hugging Face ids, random."""
from __future__ import annotations

import fsspec
import pytest

from pipeline import models
from pipeline.models import WeightsError, resolve_detector_weights, resolve_sam_checkpoint, weights_identity


def test_random_is_explicit():
    weights = resolve_sam_checkpoint("small", "random")
    assert weights.is_random and weights.config == "configs/sam2.1/sam2.1_hiera_s.yaml"
    assert weights_identity(None) == {"path": None, "sha256": None, "random": True}
    assert resolve_detector_weights("yolov8n.yaml") == "yolov8n.yaml"


def test_size_table_matches_the_sam2_1_release():
    from sam2.build_sam import HF_MODEL_ID_TO_FILENAMES

    released = {v for k, v in HF_MODEL_ID_TO_FILENAMES.items() if "sam2.1" in k}
    assert set(models.SAM_MODELS.values()) == released


def test_fsspec_checkpoint_is_copied_to_the_local_cache_once(tmp_path, monkeypatch, checkpoints):
    monkeypatch.setenv("AUTOLABEL_CACHE", str(tmp_path / "cache"))
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/bucket/sam.pt", checkpoints["sam"].read_bytes())
    first = resolve_sam_checkpoint("tiny", "memory://bucket/sam.pt")
    assert first.path.startswith(str(tmp_path / "cache")) and first.source == "memory://bucket/sam.pt"
    assert models.sha256_file(first.path) == models.sha256_file(checkpoints["sam"])
    fs.rm("/bucket/sam.pt")  # a second resolution must not read the remote copy again
    assert resolve_sam_checkpoint("tiny", "memory://bucket/sam.pt").path == first.path
    with pytest.raises(WeightsError, match="checkpoint not found: memory://bucket/other.pt"):
        resolve_sam_checkpoint("tiny", "memory://bucket/other.pt")
    assert not [p for p in (tmp_path / "cache").rglob("*.part")], "no partial copies left behind"


def test_hugging_face_ids(monkeypatch):
    with pytest.raises(WeightsError, match="does not match sam.size=large"):
        resolve_sam_checkpoint("large", "facebook/sam2.1-hiera-tiny")
    with pytest.raises(WeightsError, match="unknown Hugging Face id 'facebook/sam9-giant'"):
        resolve_sam_checkpoint("tiny", "facebook/sam9-giant")
    # offline (HF_HUB_OFFLINE=1 in the tests): a clear error, never random weights
    with pytest.raises(WeightsError, match="cannot fetch sam2.1_hiera_tiny.pt from Hugging Face"):
        resolve_sam_checkpoint("tiny", "facebook/sam2.1-hiera-tiny")


def test_official_yolo_weights_in_the_checkpoint_folder_are_used(tmp_path, monkeypatch, checkpoints):
    monkeypatch.setenv("AUTOLABEL_CHECKPOINTS", str(tmp_path))
    (tmp_path / "yolov8n.pt").write_bytes(checkpoints["yolo"].read_bytes())
    assert resolve_detector_weights("yolov8n.pt") == str(tmp_path / "yolov8n.pt")
    with pytest.raises(WeightsError, match="detector.weights: file not found: nope.pt"):
        resolve_detector_weights("nope.pt")


def test_a_segmentation_model_is_not_accepted_as_detector():
    import torch

    with pytest.raises(WeightsError, match="is a 'segment' model; a detect model is needed"):
        models.load_yolo("yolov8n-seg.yaml", torch.device("cpu"))
