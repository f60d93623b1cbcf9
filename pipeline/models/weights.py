"""Model identities and loading: the SAM 2.1 size table, checkpoint resolution, YOLO weights.

Resolution runs twice with the same code: once in the driver before any work (so a missing
checkpoint fails fast, with the command that fetches it) and once in each actor (so every node
of a cluster finds or fetches its own copy).

Weights on a cluster. Each node looks first where a container image bakes them in
(``AUTOLABEL_CHECKPOINTS``, ``/app/checkpoints`` in infra/Dockerfile; official names never touch
the network when their file is there); an official file, found or fetched, must have the
release's sha256 (``OFFICIAL_SHA256``). Weights given as a URL (``s3://``, ``gs://``, ``https://``
...) are fetched once per node into the node-local cache (``cache_dir()``): the first process to
take the entry's file lock downloads to a ``.part`` file, the others on the node wait and then
use its copy. A copy counts only once complete and checked: its sha256 is recorded beside it when
fetched and checked on every use (a corrupt entry is fetched again), and a run that knows the
digest it expects (``expected_sha256``: the driver's copy, or a pinned value) refuses anything
else, naming both digests. Hugging Face ids go through the hub's own per-node cache, which has
its own locks; a copy already in it is used without the network.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional
from urllib.parse import urlencode, urlsplit

from fsspec.callbacks import Callback

from pipeline.io.credentials import redact, redact_text, redact_uri

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
# Open-vocabulary detectors (models/yoloe.py) and ultralytics' text encoders for them: official files
# of the ultralytics/assets v8.4.0 release (where ultralytics 8.4 fetches them), not of v8.3.0.
OPEN_VOCAB_BASE_URL = "https://github.com/ultralytics/assets/releases/download/v8.4.0"
OFFICIAL_OPEN_VOCAB = ({f"yoloe-{v}{s}-seg.pt" for v in ("v8", "11") for s in "sml"} | {f"yoloe-26{s}-seg.pt" for s in "nsmlx"}
                       | {f"yolov8{s}-worldv2.pt" for s in "smlx"})
OFFICIAL_TEXT_ENCODERS = {"mobileclip_blt.ts", "mobileclip2_b.ts"}  # YOLOE v8/11, YOLOE-26 (YOLO-World: clip's own ViT-B-32.pt)
# The official files' sha256, pinned: a file fetched from (or found under the name of) an official
# URL above is used only if it is this file, so a truncated or tampered copy never sticks. None:
# no published digest was found for that file; it is then checked by Content-Length only.
OFFICIAL_SHA256: dict[str, Optional[str]] = {
    # SAM 2.1 (092824): the Git LFS sha256 of Meta's own Hugging Face repos, which hold the same
    # files (huggingface.co/facebook/sam2.1-hiera-{tiny,small}/blob/main/<file>: "Git LFS Details");
    # base_plus and large as the LFS pointers of mirrors of all four (huggingface.co/camenduru/
    # sam2-1-hiera, commit cdd35a4, whose tiny and small digests are Meta's), each seen again in
    # other mirrors (huggingface.co/Promethe-us/sam2, huggingface.co/spaces/wondervictor/Mask-Adapter).
    "sam2.1_hiera_tiny.pt": "7402e0d864fa82708a20fbd15bc84245c2f26dff0eb43a4b5b93452deb34be69",  # 156008466 bytes
    "sam2.1_hiera_small.pt": "6d1aa6f30de5c92224f8172114de081d104bbd23dd9dc5c58996f0cad5dc4d38",  # 184416285 bytes
    "sam2.1_hiera_base_plus.pt": "a2345aede8715ab1d5d31b4a509fb160c5a4af1970f199d9054ccfb746c004c5",  # 323606802 bytes
    "sam2.1_hiera_large.pt": "2647878d5dfa5098f2f8649825738a9345572bae2d4350a2468587ece47dd318",  # 898083611 bytes
    # ultralytics/assets release v8.3.0: the digests GitHub publishes for the release assets, as
    # pinned for these very URLs (.../releases/download/v8.3.0/<file>) by independent projects'
    # download scripts (public GitHub code); the same files are re-attached to v8.4.0 with the same
    # digests. (The v0.0.0 files differ: yolov8n.pt there is 31e20dde..., 6534387 bytes.)
    "yolov8n.pt": "f59b3d833e2ff32e194b5bb8e08d211dc7c5bdf144b90d2c8412c47ccfc83b36",  # 6549796 bytes
    "yolov8s.pt": "1f47a78bf100391c2a140b7ac73a1caae18c32779be7d310658112f7ac9aa78a",  # 22588772 bytes
    "yolov8m.pt": "5d4a90cdc7a21786cc59cd19778e9eafff836df9e2da32524737c7ee6efe4fe5",  # 52136884 bytes
    # yolov8l.pt: only found pinned for the v8.4.0 asset (64c9115303f6a25575f82200d1b22ec409fa6bd7d08d0313884fc20d919478cd,
    # 87792836 bytes), never for the v8.3.0 URL: not pinned until confirmed.
    "yolov8l.pt": None,
    "yolov8x.pt": "3df4ada6b4dad6d657868f2fdf7faecfb34dcfccf3a25c4b82079064718524c8",  # 136890692 bytes
    "yolo11n.pt": "0ebbc80d4a7680d14987a577cd21342b65ecfd94632bd9a8da63ae6417644ee1",  # 5613764 bytes
    "yolo11s.pt": "85a76fe86dd8afe384648546b56a7a78580c7cb7b404fc595f97969322d502d5",  # 19313732 bytes
    "yolo11m.pt": "d5ffc1a674953a08e11a8d21e022781b1b23a19b730afc309290bd9fb5305b95",  # 40684120 bytes
    "yolo11l.pt": "9ebd0e09d59811db4b1d61e2bc6730649608b1ac47f8dd01e2da6bca7c20023f",  # 51387343 bytes
    "yolo11x.pt": "7bc158aa95c0ebfdd87f70f01653c1131b93e92522dbe15c228bcd742e773a24",  # 114636239 bytes
}
FETCH_COMMAND = "bash checkpoints/download_ckpts.sh"
RANDOM_HINT = "sam.checkpoint=random detector.weights=yolov8n.yaml runs the whole job as a smoke test with random weights"
# How long a process waits for another one on its node that is fetching the same weights.
LOCK_TIMEOUT_S = float(os.environ.get("AUTOLABEL_WEIGHTS_LOCK_TIMEOUT", 3600))


class WeightsError(RuntimeError):
    """Weights cannot be found or fetched; the message says how to get them."""


def checkpoint_dir() -> Path:
    return Path(os.environ.get("AUTOLABEL_CHECKPOINTS", "checkpoints"))


def cache_dir() -> Path:
    return Path(os.environ.get("AUTOLABEL_CACHE", Path.home() / ".cache" / "autolabel"))


def is_url(spec: str) -> bool:
    return "://" in spec


# (real path, inode, size, mtime) -> sha256: the driver checks a copy when it fetches it and
# again for run.json; a file that changes gets a new key.
_DIGESTS: dict[tuple, str] = {}


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns)
    if key in _DIGESTS:
        return _DIGESTS[key]
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def normal_digest(expected: Optional[str], what: str = "weights") -> Optional[str]:
    """An expected sha256 as 64 lowercase hex digits (``sha256:`` prefix allowed), or None."""
    if not expected:
        return None
    digest = expected.strip().lower().removeprefix("sha256:")
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise WeightsError(f"{what}: expected sha256 {expected!r} is not 64 hex digits")
    return digest


def verify_sha256(path: str | Path, expected: Optional[str], what: str = "weights") -> str:
    """The file's sha256; a WeightsError naming both digests if it is not the expected one."""
    actual = sha256_file(path)
    expected = normal_digest(expected, what)
    if expected and actual != expected:
        raise WeightsError(
            f"{what}: {path} has sha256 {actual}, but this run expects {expected}.\n"
            f"  Every node must load the same weights: replace that file (or the object it was copied from)."
        )
    return actual


@contextlib.contextmanager
def node_lock(lock_path: Path, what: str) -> Iterator[None]:
    """An exclusive lock among the processes of this node (an flock: released if the holder
    dies, even by SIGKILL). Waits up to ``AUTOLABEL_WEIGHTS_LOCK_TIMEOUT`` seconds, saying so."""
    from filelock import FileLock, Timeout

    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path))
    deadline = time.monotonic() + LOCK_TIMEOUT_S
    while True:
        try:
            lock.acquire(timeout=max(0.0, min(30.0, deadline - time.monotonic())))
            break
        except Timeout:
            if time.monotonic() >= deadline:
                raise WeightsError(
                    f"{what}: another process on this node has held {lock_path} for over {LOCK_TIMEOUT_S:.0f} s "
                    "(AUTOLABEL_WEIGHTS_LOCK_TIMEOUT); is its download stuck?"
                ) from None
            log.info("waiting for another process on this node that is fetching %s", what)
    try:
        yield
    finally:
        lock.release()


class _LogProgress(Callback):
    """fsspec callback: a log line every 10% (actors' logs reach the driver; bars would not)."""

    def __init__(self, desc: str):
        super().__init__()
        self.desc = desc
        self.next_share = 0.1

    def call(self, *args, **kwargs):
        if self.size and self.value >= self.next_share * self.size:
            log.info("%s: %d%% of %.1f MB", self.desc, 100 * self.value // self.size, self.size / 1e6)
            self.next_share = self.value / self.size + 0.1


def _remove_parts(dest: Path) -> None:
    """Partial downloads of ``dest`` left by a process that died (called under the entry's lock)."""
    for part in dest.parent.glob(f".{dest.name}.*.part"):
        with contextlib.suppress(FileNotFoundError):
            part.unlink()


def _part_file(dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    os.close(fd)
    return Path(tmp)


def copy_url(url: str, dest: Path, storage_options: Optional[dict] = None, what: str = "checkpoint") -> None:
    """Copy ``url`` (any fsspec URL: s3://, gs://, https:// ...) to the local file ``dest`` as it
    is, without locks or checks (``fetch_once`` adds those)."""
    from fsspec.core import url_to_fs

    shown = redact_uri(url)
    try:
        fs, path = url_to_fs(url, **(storage_options or {}))
        progress = _LogProgress(f"fetching {shown}")
        fs.get_file(path, str(dest), callback=progress)  # a short read raises (aiohttp, botocore check lengths)
    except FileNotFoundError:
        raise WeightsError(f"{what} not found: {shown}") from None
    except Exception as exc:  # noqa: BLE001 - storage back-ends raise many classes; all mean "cannot read it"
        raise WeightsError(redact(redact_text(f"cannot read {what} {url}: {type(exc).__name__}: {exc}"), storage_options)) from None


def cached_path(url: str, params: Optional[list] = None) -> Path:
    """Where ``fetch_once`` keeps its copy of ``url`` on this node, keyed by the whole URL: the
    query string too, which the config moved into the storage options' ``params`` (only a digest
    of it is in the path)."""
    whole = url if not params else f"{url}?{urlencode([tuple(p) for p in params])}"
    key = hashlib.sha256(whole.encode()).hexdigest()[:16]
    name = Path(urlsplit(url).path).name or "weights"
    return cache_dir() / "checkpoints" / key / name


def _recorded(dest: Path) -> Optional[str]:
    try:
        return Path(f"{dest}.sha256").read_text().split()[0]
    except (FileNotFoundError, IndexError):
        return None


def _record(dest: Path, digest: str) -> None:
    tmp = _part_file(Path(f"{dest}.sha256"))
    tmp.write_text(f"{digest}  {dest.name}\n")
    os.replace(tmp, f"{dest}.sha256")


def fetch_once(url: str, expected_sha256: Optional[str] = None, storage_options: Optional[dict] = None,
               what: str = "checkpoint") -> Path:
    """Remote weights as a local file in this node's cache, fetched at most once per node.

    Under the entry's lock: a cached copy is used if its sha256 is the one recorded when it was
    fetched (and the expected one, if given); otherwise (absent, corrupt, other contents) it is
    fetched to a ``.part`` file, checked, and only then moved into place. A download whose
    digest is not ``expected_sha256`` is refused with both digests and is not kept.
    """
    expected = normal_digest(expected_sha256, what)
    dest = cached_path(url, (storage_options or {}).get("params"))
    shown = redact_uri(url)
    with node_lock(Path(f"{dest}.lock"), shown):
        problem = None
        if dest.is_file():
            actual, recorded = sha256_file(dest), _recorded(dest)
            if expected and actual != expected:
                problem = f"the cached copy {dest} has sha256 {actual}, not the expected {expected}"
            elif recorded and actual != recorded:
                problem = f"the cached copy {dest} is corrupt: sha256 {actual}, but {recorded} when it was fetched"
            else:
                if not recorded:  # made by an older version: record what it holds now
                    _record(dest, actual)
                return dest
            log.warning("%s: %s; fetching it again", shown, problem)  # it stays until a good copy replaces it
        _remove_parts(dest)
        tmp = _part_file(dest)
        try:
            log.info("fetching %s into this node's cache %s", shown, dest.parent)
            try:
                copy_url(url, tmp, storage_options, what)
            except WeightsError as exc:
                raise WeightsError(f"{exc}\n  ({problem})" if problem else str(exc)) from None
            actual = sha256_file(tmp)
            if expected and actual != expected:
                raise WeightsError(
                    f"{what}: {shown} has sha256 {actual}, but this run expects {expected}; "
                    "the copy was not kept. Is it the object you meant (or has it changed since the run started)?"
                )
            _record(dest, actual)
            os.replace(tmp, dest)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    return dest


def official_mismatch(path: str | Path, name: str) -> Optional[str]:
    """Why the file at ``path`` is not the official ``name`` (its sha256 is not the pinned one), or None."""
    pinned = OFFICIAL_SHA256.get(name)
    actual = sha256_file(path) if pinned else None
    if pinned and actual != pinned:
        return f"sha256 {actual}, but the official {name} has {pinned}"
    return None


def _check_official(path: str | Path, name: str) -> None:
    """A file found under an official name must be the official file (a truncated download, or
    another file put there under that name, is refused, not used)."""
    problem = official_mismatch(path, name)
    if problem:
        raise WeightsError(
            f"{name}: {path} has {problem} (a truncated download, or another file under the official name).\n"
            f"  Delete it to have the official file fetched again (or: {FETCH_COMMAND}); to use your own file, "
            "give its path instead of the official name."
        )


def _download(url: str, dest: Path) -> Path:
    """Fetch ``url`` to ``dest`` with a progress bar, atomically (no half files left behind);
    an official file whose sha256 is not the pinned one is refused and not kept."""
    from tqdm import tqdm

    tmp = _part_file(dest)
    try:
        with open(tmp, "wb") as out, urllib.request.urlopen(url, timeout=30) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"fetching {dest.name}") as bar:
                while block := resp.read(1 << 20):
                    out.write(block)
                    bar.update(len(block))
        if total and tmp.stat().st_size != total:
            raise OSError(f"the download stopped after {tmp.stat().st_size} of {total} bytes")
        problem = official_mismatch(tmp, dest.name)
        if problem:
            raise WeightsError(f"{dest.name}: the download from {url} was not kept: {problem}. "
                               f"Try again; if it persists, something between here and {urlsplit(url).netloc} alters it.")
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return dest


def _writable_dir(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


def _fetch_official(name: str, url: str, expected_sha256: Optional[str] = None) -> Path:
    """An official checkpoint: the file in ``checkpoint_dir()`` (baked into the image, or fetched
    before) without any network; else fetched once per node, there, or into the node's cache
    when that folder is read-only."""
    fallback = cache_dir() / "official"
    if (checkpoint_dir() / name).is_file():  # the user's folder (or the image's): refused if not the official file
        _check_official(checkpoint_dir() / name, name)
        verify_sha256(checkpoint_dir() / name, expected_sha256, name)
        return checkpoint_dir() / name
    if (fallback / name).is_file() and not official_mismatch(fallback / name, name):
        verify_sha256(fallback / name, expected_sha256, name)
        return fallback / name
    dest = (checkpoint_dir() if _writable_dir(checkpoint_dir()) else fallback) / name
    with node_lock(cache_dir() / "locks" / f"{name}.lock", name):
        if dest.is_file() and dest.parent == fallback and official_mismatch(dest, name):  # our cache's copy: fetched again
            log.warning("%s: the cached copy %s has %s; fetching it again", name, dest, official_mismatch(dest, name))
            dest.unlink()
        if not dest.is_file():  # another process may have fetched it while this one waited
            _remove_parts(dest)
            log.info("%s is not in %s; fetching it once from %s", name, checkpoint_dir(), url)
            try:
                _download(url, dest)
            except OSError as exc:
                raise WeightsError(
                    f"{name} is not in {checkpoint_dir()}/ and could not be downloaded ({exc}).\n"
                    f"  Get the official weights with: {FETCH_COMMAND}\n"
                    f"  or point to a copy, e.g. sam.checkpoint=/path/{name}.\n"
                    f"  Offline, {RANDOM_HINT}."
                ) from None
    _check_official(dest, name)
    verify_sha256(dest, expected_sha256, name)
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


def resolve_sam_checkpoint(size: str, spec: str, expected_sha256: Optional[str] = None,
                           storage_options: Optional[dict] = None) -> SamWeights:
    """Turn ``sam.checkpoint`` into a local file (fetching or copying it if needed).

    ``expected_sha256``: the digest the file must have (e.g. the driver's copy, so every node
    of a cluster provably loads the same weights); ``storage_options`` for an fsspec URL (by
    default the node's own environment: instance roles, ``AWS_*`` variables ...)."""
    config, official_name = SAM_MODELS[size]
    if spec == "random":
        return SamWeights(size, config, None, spec)
    if spec == "auto":
        path = _fetch_official(official_name, f"{SAM_BASE_URL}/{official_name}", expected_sha256)
        return SamWeights(size, config, str(path), spec)
    if is_url(spec) and not spec.startswith("file://"):
        return SamWeights(size, config, str(fetch_once(spec, expected_sha256, storage_options, "checkpoint")), spec)
    local = Path(spec.removeprefix("file://")).expanduser()
    if local.is_file():
        verify_sha256(local, expected_sha256, "sam.checkpoint")
        return SamWeights(size, config, str(local), spec)
    if re.fullmatch(r"[\w-]+/[\w.-]+", spec) and not spec.endswith((".pt", ".pth", ".ckpt")):
        return _resolve_hf(size, spec, expected_sha256)
    raise WeightsError(
        f"sam.checkpoint: file not found: {redact_uri(spec)}\n"
        f"  Get the official SAM 2.1 weights with: {FETCH_COMMAND}  (then sam.checkpoint=auto)\n"
        f"  Offline, {RANDOM_HINT}."
    )


def _resolve_hf(size: str, model_id: str, expected_sha256: Optional[str] = None) -> SamWeights:
    from huggingface_hub import hf_hub_download
    from sam2.build_sam import HF_MODEL_ID_TO_FILENAMES

    if model_id not in HF_MODEL_ID_TO_FILENAMES:
        known = ", ".join(k for k in HF_MODEL_ID_TO_FILENAMES if "sam2.1" in k)
        raise WeightsError(f"sam.checkpoint: unknown Hugging Face id '{model_id}'; known: {known}")
    config, filename = HF_MODEL_ID_TO_FILENAMES[model_id]
    hf_size = next((s for s, (_, name) in SAM_MODELS.items() if name == filename), None)
    if hf_size != size:
        raise WeightsError(f"sam.checkpoint '{model_id}' holds {filename}, which does not match sam.size={size}")
    try:  # already in this node's hub cache (HF_HOME; baked into an image): no network at all
        path = hf_hub_download(repo_id=model_id, filename=filename, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached: fetch it (the hub's cache locks per file)
        try:
            path = hf_hub_download(repo_id=model_id, filename=filename)
        except Exception as exc:  # hub errors come in many classes; all mean "could not get it"
            raise WeightsError(
                f"sam.checkpoint: cannot fetch {filename} from Hugging Face '{model_id}' ({type(exc).__name__}).\n"
                f"  Offline, {RANDOM_HINT}."
            ) from None
    _check_official(path, filename)  # Meta's repos hold the release files: the same pinned digests
    verify_sha256(path, expected_sha256, f"sam.checkpoint {model_id}")
    return SamWeights(size, config, path, model_id)


def resolve_detector_weights(spec: str, expected_sha256: Optional[str] = None, storage_options: Optional[dict] = None) -> str:
    """Turn ``detector.weights`` into something ``ultralytics.YOLO`` loads without a network
    (``expected_sha256``, ``storage_options``: as for ``resolve_sam_checkpoint``)."""
    if spec.endswith((".yaml", ".yml")):
        return spec  # ultralytics builds random weights from its model configs
    if spec in OFFICIAL_YOLO and not Path(spec).is_file():
        return str(_fetch_official(spec, f"{YOLO_BASE_URL}/{spec}", expected_sha256))
    if spec in OFFICIAL_OPEN_VOCAB and not Path(spec).is_file():
        return str(_fetch_official(spec, f"{OPEN_VOCAB_BASE_URL}/{spec}", expected_sha256))
    if is_url(spec) and not spec.startswith("file://"):
        return str(fetch_once(spec, expected_sha256, storage_options, "detector weights"))
    local = Path(spec.removeprefix("file://")).expanduser()
    if local.is_file():
        verify_sha256(local, expected_sha256, "detector.weights")
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
    from ultralytics.nn.tasks import YOLOEModel

    model = YOLO(weights)
    # A YOLOE is a 'segment' model (yoloe-*-seg.pt): only its boxes are used; SAM makes the masks.
    if model.task != "detect" and not isinstance(model.model, YOLOEModel):
        raise WeightsError(f"detector.weights: {weights} is a '{model.task}' model; a detect model is needed")
    if weights.endswith((".yaml", ".yml")) and len(model.names) == 80:
        # A model built from its .yaml has numbered classes; the official 80-class weights use
        # COCO's names, so a random-weight smoke run reports the same class names as a real one.
        from ultralytics.utils import ROOT, YAML

        model.model.names = dict(YAML.load(ROOT / "cfg/datasets/coco.yaml")["names"])
    model.to(device)
    return model
