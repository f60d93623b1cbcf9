"""Model identities and loading: the SAM 2.1 size table, checkpoint resolution, YOLO weights.

Resolution runs twice with the same code: once in the driver before any work (so a missing
checkpoint fails fast, with the command that fetches it) and once in each actor (so every node
of a cluster finds or fetches its own copy).
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .config import redact_text, redact_uri

log = logging.getLogger(__name__)

SAM_BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything_2/092824"
YOLO_BASE_URL = "https://github.com/ultralytics/assets/releases/download/v8.3.0"

# size -> (sam2 hydra config, official checkpoint file), as in the SAM 2.1 release.
SAM_MODELS = {
    "tiny": ("configs/sam2.1/sam2.1_hiera_t.yaml", "sam2.1_hiera_tiny.pt"),
    "small": ("configs/sam2.1/sam2.1_hiera_s.yaml", "sam2.1_hiera_small.pt"),
    "base_plus": ("configs/sam2.1/sam2.1_hiera_b+.yaml", "sam2.1_hiera_base_plus.pt"),
    "large": ("configs/sam2.1/sam2.1_hiera_l.yaml", "sam2.1_hiera_large.pt"),
}
OFFICIAL_YOLO = {f"yolov8{s}.pt" for s in "nsmlx"} | {f"yolo11{s}.pt" for s in "nsmlx"}
FETCH_COMMAND = "bash checkpoints/download_ckpts.sh"
RANDOM_HINT = "sam.checkpoint=random detector.weights=yolov8n.yaml runs the whole job as a smoke test with random weights"


class WeightsError(RuntimeError):
    """Weights cannot be found or fetched; the message says how to get them."""


def checkpoint_dir() -> Path:
    return Path(os.environ.get("AUTOLABEL_CHECKPOINTS", "checkpoints"))


def cache_dir() -> Path:
    return Path(os.environ.get("AUTOLABEL_CACHE", Path.home() / ".cache" / "autolabel"))


def is_url(spec: str) -> bool:
    return "://" in spec


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _download(url: str, dest: Path) -> Path:
    """Fetch ``url`` to ``dest`` with a progress bar, atomically (no half files left behind)."""
    from tqdm import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=30) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"fetching {dest.name}") as bar:
                while block := resp.read(1 << 20):
                    out.write(block)
                    bar.update(len(block))
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return dest


def _fetch_official(name: str, url: str) -> Path:
    dest = checkpoint_dir() / name
    if dest.is_file():
        return dest
    log.info("%s is not in %s; fetching it once from %s", name, checkpoint_dir(), url)
    try:
        return _download(url, dest)
    except OSError as exc:
        raise WeightsError(
            f"{name} is not in {checkpoint_dir()}/ and could not be downloaded ({exc}).\n"
            f"  Get the official weights with: {FETCH_COMMAND}\n"
            f"  or point to a copy, e.g. sam.checkpoint=/path/{name}.\n"
            f"  Offline, {RANDOM_HINT}."
        ) from None


def _copy_from_fsspec(url: str, storage_options: Optional[dict] = None) -> Path:
    """Copy a remote checkpoint into the node-local cache once (keyed by URL)."""
    import fsspec

    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    dest = cache_dir() / "checkpoints" / key / Path(url.split("?")[0]).name
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, suffix=".part")
    os.close(fd)
    try:
        with fsspec.open(url, "rb", **(storage_options or {})) as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 22)
        os.replace(tmp, dest)
    except FileNotFoundError:
        raise WeightsError(f"checkpoint not found: {redact_uri(url)}") from None
    except (OSError, ValueError) as exc:
        raise WeightsError(redact_text(f"cannot read checkpoint {url}: {exc}")) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return dest


@dataclass(frozen=True)
class SamWeights:
    size: str
    config: str  # sam2 hydra config name
    path: Optional[str]  # local file, or None for random weights
    source: str  # what the user asked for

    @property
    def is_random(self) -> bool:
        return self.path is None


def resolve_sam_checkpoint(size: str, spec: str) -> SamWeights:
    """Turn ``sam.checkpoint`` into a local file (fetching or copying it if needed)."""
    config, official_name = SAM_MODELS[size]
    if spec == "random":
        return SamWeights(size, config, None, spec)
    if spec == "auto":
        path = _fetch_official(official_name, f"{SAM_BASE_URL}/{official_name}")
        return SamWeights(size, config, str(path), spec)
    if is_url(spec) and not spec.startswith("file://"):
        return SamWeights(size, config, str(_copy_from_fsspec(spec)), spec)
    local = Path(spec.removeprefix("file://")).expanduser()
    if local.is_file():
        return SamWeights(size, config, str(local), spec)
    if re.fullmatch(r"[\w-]+/[\w.-]+", spec) and not spec.endswith((".pt", ".pth", ".ckpt")):
        return _resolve_hf(size, spec)
    raise WeightsError(
        f"sam.checkpoint: file not found: {redact_uri(spec)}\n"
        f"  Get the official SAM 2.1 weights with: {FETCH_COMMAND}  (then sam.checkpoint=auto)\n"
        f"  Offline, {RANDOM_HINT}."
    )


def _resolve_hf(size: str, model_id: str) -> SamWeights:
    from huggingface_hub import hf_hub_download
    from sam2.build_sam import HF_MODEL_ID_TO_FILENAMES

    if model_id not in HF_MODEL_ID_TO_FILENAMES:
        known = ", ".join(k for k in HF_MODEL_ID_TO_FILENAMES if "sam2.1" in k)
        raise WeightsError(f"sam.checkpoint: unknown Hugging Face id '{model_id}'; known: {known}")
    config, filename = HF_MODEL_ID_TO_FILENAMES[model_id]
    hf_size = next((s for s, (_, name) in SAM_MODELS.items() if name == filename), None)
    if hf_size != size:
        raise WeightsError(f"sam.checkpoint '{model_id}' holds {filename}, which does not match sam.size={size}")
    try:
        path = hf_hub_download(repo_id=model_id, filename=filename)
    except Exception as exc:  # hub errors come in many classes; all mean "could not get it"
        raise WeightsError(
            f"sam.checkpoint: cannot fetch {filename} from Hugging Face '{model_id}' ({type(exc).__name__}).\n"
            f"  Offline, {RANDOM_HINT}."
        ) from None
    return SamWeights(size, config, path, model_id)


def resolve_detector_weights(spec: str) -> str:
    """Turn ``detector.weights`` into something ``ultralytics.YOLO`` loads without a network."""
    if spec.endswith((".yaml", ".yml")):
        return spec  # ultralytics builds random weights from its model configs
    if spec in OFFICIAL_YOLO and not Path(spec).is_file():
        return str(_fetch_official(spec, f"{YOLO_BASE_URL}/{spec}"))
    if is_url(spec) and not spec.startswith("file://"):
        return str(_copy_from_fsspec(spec))
    local = Path(spec.removeprefix("file://")).expanduser()
    if local.is_file():
        return str(local)
    raise WeightsError(
        f"detector.weights: file not found: {redact_uri(spec)}\n"
        f"  Use an official name such as yolov8n.pt (fetched into {checkpoint_dir()}/), a .pt path or URL,\n"
        f"  or a model .yaml such as yolov8n.yaml for random weights."
    )


def weights_identity(path: Optional[str]) -> dict:
    """What run.json records about one set of weights."""
    if path is None or path.endswith((".yaml", ".yml")):
        return {"path": path, "sha256": None, "random": True}
    return {"path": str(path), "sha256": sha256_file(path), "random": False}


def pick_device(requested: str) -> "torch.device":
    import torch

    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device '{requested}' asked for, but this worker has no CUDA device")
    return device


def build_sam_model(weights: SamWeights, image_size: int, device: "torch.device", compile_encoder: bool = False):
    """``build_sam2`` (the SAM 2.1 size table's config and checkpoint), at ``image_size``, in eval
    mode; ``compile_encoder`` compiles the image encoder as SAM 2's own ``compile_image_encoder``
    does (max-autotune, one static shape: the first batch takes minutes, the rest are faster)."""
    from sam2.build_sam import build_sam2

    overrides = [] if image_size == 1024 else [f"++model.image_size={image_size}"]
    if compile_encoder:
        overrides.append("++model.compile_image_encoder=true")
    return build_sam2(weights.config, weights.path, device=str(device), mode="eval", hydra_overrides_extra=overrides)


def load_yolo(weights: str, device: "torch.device"):
    from ultralytics import YOLO

    model = YOLO(weights)
    if model.task != "detect":
        raise WeightsError(f"detector.weights: {weights} is a '{model.task}' model; a detect model is needed")
    if weights.endswith((".yaml", ".yml")) and len(model.names) == 80:
        # A model built from its .yaml has numbered classes; the official 80-class weights use
        # COCO's names, so a random-weight smoke run reports the same class names as a real one.
        from ultralytics.utils import ROOT, YAML

        model.model.names = dict(YAML.load(ROOT / "cfg/datasets/coco.yaml")["names"])
    model.to(device)
    return model
