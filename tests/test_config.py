"""Config validation and the command line's behaviour on bad input (nothing may start)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import REPO, autolabel_cli
from pipeline.config import ConfigError, RunConfig, allowed_keys, load_config
from pipeline.models import weights as models
from pipeline.run.job import run


def test_default_yaml_mirrors_the_typed_defaults():
    documented = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    assert documented == RunConfig().model_dump(mode="json")


def test_every_config_file_in_configs_validates():
    for path in (REPO / "configs").glob("*.yaml"):
        load_config(path)


def test_design_keys_exist():
    for key in (
        "input.uri", "output.uri", "detector.weights", "detector.conf", "detector.iou", "detector.classes",
        "detector.max_det", "detector.imgsz", "sam.size", "sam.checkpoint", "sam.image_size", "sam.dtype",
        "sam.multimask", "prompts.source", "input.shard_size",
    ):
        assert key in allowed_keys()


def test_overrides_are_typed_and_layered_over_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("detector:\n  conf: 0.5\n  classes: [0, 2]\nsam:\n  size: small\n")
    cfg = load_config(path, ["detector.conf=0.3", "sam.multimask=true", "input.uri=s3://bucket/a:b/*.jpg", "input.storage_options.anon=true"])
    assert cfg.detector.conf == 0.3 and cfg.detector.classes == [0, 2] and cfg.sam.size == "small"
    assert cfg.sam.multimask is True
    assert cfg.input.uri == "s3://bucket/a:b/*.jpg"
    assert cfg.input.storage_options == {"anon": True}
    assert cfg.input.extensions[0] == ".jpg"


@pytest.mark.parametrize(
    "override, expected",
    [
        ("detector.confidence=0.3", "unknown config key 'detector.confidence'; allowed keys: detector.weights, detector.conf"),
        ("sam.size=huge", "sam.size: Input should be 'tiny', 'small', 'base_plus' or 'large' (got 'huge')"),
        ("detector.conf=-0.1", "detector.conf: Input should be greater than or equal to 0"),
        ("detector.imgsz=500", "detector.imgsz: must be a multiple of 32"),
        ("sam.image_size=300", "sam.image_size: must be a multiple of 64"),
        ("sam.dtype=fp16", "sam.dtype: Input should be 'auto', 'bfloat16' or 'float32'"),
        ("input.shard_size=0", "input.shard_size: Input should be greater than 0"),
        ("output.uri=memory://out", "output.uri: memory:// lives inside one process"),
        ("detector.conf", "is not key=value"),
        ("prompts.source=manifest", "prompts.manifest: required when prompts.source=manifest"),
        ("prompts.source=points", "prompts.source: Input should be 'detector', 'manifest' or 'both'"),
        ("sam.multimask=maybe", "sam.multimask"),
        # run counts and pixel positions are 32-bit: a larger image could not be encoded (issue 16, item 14)
        ("input.max_pixels=2147483648", "input.max_pixels: at most 2147483647 (2**31 - 1): a mask's pixel positions"),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert expected in str(err.value)


def test_a_storage_option_that_does_not_parse_is_not_echoed():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["input.storage_options.secret=[s3cr3t-value"])
    assert "input.storage_options.secret: cannot parse the value" in str(err.value) and "s3cr3t" not in str(err.value)


def test_the_largest_max_pixels_that_fits_32_bit_run_counts_is_accepted():
    assert load_config(None, ["input.max_pixels=2147483647"]).input.max_pixels == 2**31 - 1


def test_unknown_section_in_a_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("detecter:\n  conf: 0.5\n")
    with pytest.raises(ConfigError, match="unknown config key 'detecter'"):
        load_config(path)


def _cli(*args, cwd=REPO, env=None):
    return subprocess.run([*autolabel_cli(), "run", *args], capture_output=True, text=True, cwd=cwd, timeout=120, env=env)


@pytest.mark.parametrize(
    "args, message",
    [
        (["sam.size=huge"], "sam.size: Input should be"),
        (["detector.conf=-1"], "detector.conf: Input should be greater than or equal to 0"),
        (["bogus.key=1"], "unknown config key 'bogus.key'"),
        (["sam.checkpoint=/nonexistent/sam2.1_hiera_tiny.pt"], "sam.checkpoint: file not found: /nonexistent/sam2.1_hiera_tiny.pt"),
        (["--config", "/nonexistent.yaml"], "config file not found: /nonexistent.yaml"),
        (["sam.checkpoint=random", "detector.weights=/nope/y.pt"], "detector.weights: file not found: /nope/y.pt"),
        (["input.uri=/nonexistent/photos", "sam.checkpoint=random"], "input.uri: nothing found at /nonexistent/photos"),
        (["input.uri=pipeline", "sam.checkpoint=random"], "input.uri: no images with suffix .jpg"),
        (["input.max_pixels=3000000000"], "input.max_pixels: at most 2147483647 (2**31 - 1)"),
    ],
)
def test_cli_rejects_bad_config_before_any_work(tmp_path, args, message):
    out = tmp_path / "out"
    proc = _cli(*args, f"output.uri={out}", env={**os.environ, "AUTOLABEL_LOG_DIR": str(tmp_path / "logs")})
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    logged = "".join(p.read_text() for p in (tmp_path / "logs").glob("*.log"))  # Ray's own lines go there
    assert "Started a local Ray instance" not in proc.stderr + proc.stdout + logged
    assert "actors:" not in proc.stderr
    assert not out.exists(), "nothing may be written for a rejected config"


def test_missing_checkpoint_says_how_to_fetch_it(tmp_path):
    proc = _cli("sam.checkpoint=/nonexistent/x.pt", f"output.uri={tmp_path / 'o'}")
    assert "bash checkpoints/download_ckpts.sh" in proc.stderr
    assert "sam.checkpoint=random detector.weights=yolov8n.yaml" in proc.stderr


def test_official_weights_unreachable_stops_before_work(tmp_path, monkeypatch):
    """Offline: the job stops with how to get the weights; it never falls back to random ones."""
    monkeypatch.setenv("AUTOLABEL_CHECKPOINTS", str(tmp_path / "empty"))
    monkeypatch.setattr(models, "SAM_BASE_URL", "http://127.0.0.1:9/unreachable")  # closed port: a real refused connection
    cfg = load_config(None, [f"output.uri={tmp_path / 'out'}", "detector.weights=yolov8n.yaml"])
    with pytest.raises(ConfigError) as err:
        run(cfg)
    text = str(err.value)
    assert "sam2.1_hiera_tiny.pt is not in" in text and "bash checkpoints/download_ckpts.sh" in text
    assert "sam.checkpoint=random detector.weights=yolov8n.yaml" in text
    assert not (tmp_path / "out").exists()
    assert not list((tmp_path / "empty").glob("*")), "no partial download may be left behind"


def test_folder_with_other_files_is_not_overwritten_without_asking(tmp_path):
    out = tmp_path / "out"
    (out / "images").mkdir(parents=True)
    (out / "images" / "part.parquet").write_bytes(b"previous run")
    proc = _cli("sam.checkpoint=random", "detector.weights=yolov8n.yaml", f"output.uri={out}")
    assert proc.returncode == 2
    assert "holds run files" in proc.stderr and "no run.json" in proc.stderr and "--overwrite" in proc.stderr
    assert (out / "images" / "part.parquet").read_bytes() == b"previous run"


def test_help_lists_the_config_keys():
    proc = subprocess.run([*autolabel_cli(), "run", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "detector.conf" in proc.stdout and "sam.checkpoint" in proc.stdout


def test_python_dash_m_pipeline_is_the_same_cli():
    import sys

    proc = subprocess.run([sys.executable, "-m", "pipeline", "run", "sam.size=huge"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 2 and "sam.size" in proc.stderr


def test_jobs_entry_point_takes_run_arguments():
    import sys

    proc = subprocess.run([sys.executable, str(Path("jobs") / "autolabel.py"), "sam.size=huge"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 2 and "sam.size" in proc.stderr
