"""The run folder as a resumable record: what was asked for, what is done, what is left.

``RUN/run.json`` holds the run's fingerprint (the config keys that change results, and the
sha256 of each model's weights), the shard listing's state and the progress. Shards count as
done by their marker ``RUN/_done/shard-X.json``, written only after the shard's output files
(see sink.py). Rerunning the same command resumes: done shards are skipped, everything else is
cleaned and redone. A different config or different weights is refused, unless ``--overwrite``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import uuid
from typing import Optional

from fsspec.core import url_to_fs

from pipeline.config import ConfigError, RunConfig, redact_uri, redacted_config
from pipeline.io.locations import normalise_uri
from pipeline.io.shards import SHARDS_DIR
from pipeline.run.ownership import CHUNKS_DIR, CLASS_EMBEDDINGS, RUN_DATA, RUN_FILE_NAMES, Inventory, normalised_path, run_inventory
from pipeline.run.sink import DONE_DIR, STAGING_DIR, OutputWriteError, atomic_write
from pipeline.run.video_chunks import unfinished_chunk_files

log = logging.getLogger("autolabel")

RUN_FOLDERS = ("images", "objects", SHARDS_DIR, STAGING_DIR, DONE_DIR, CHUNKS_DIR, "report", "exports", "review")
# Keys that change speed or memory (or how storage is reached: credentials, endpoints) but not a
# single output row; they may differ on a resume. (The output, ray and report sections are not in
# the fingerprint at all.)
PERFORMANCE_ONLY = ("input.storage_options", "detector.storage_options", "sam.storage_options", "detector.batch_size",
                    "sam.batch_size", "sam.box_chunk", "sam.compile", "automatic.points_per_batch",
                    "detector.decode_ahead_mp", "sam.decode_ahead_mp", "video.offload_state_to_cpu")
# Keys that, while unset (null), are left out of the fingerprint: a run started before they existed
# resumes as it did.
ABSENT_WHEN_NULL = ("detector.class_embeddings", "detector.visual_prompts")
# URIs compared as the places they name: ``photos/``, ``photos`` and ``./photos`` are one input.
NORMALISED_URIS = (("input", "uri"), ("prompts", "manifest"))


def fingerprint(cfg: RunConfig, models: dict, dtype: Optional[str] = None) -> dict:
    """What must not change between a run and its resume: the config that shapes the output
    (input, prompts, detector, sam, qa, video; not output/ray/report) and the weights, by content.
    ``models`` is run.json's models section (``weights_identity`` of each).

    ``sam.dtype`` enters as the dtype SAM actually ran in (``dtype``, known once Ray says where
    the actors run), not as asked: ``auto`` means bfloat16 on a GPU and float32 on a CPU, and a
    run must not mix the two. Without ``dtype`` it is left out."""
    data = redacted_config(cfg)  # credentials never reach run.json; rotating them does not block a resume
    sections = ("input", "prompts", "detector", "sam", "qa") if cfg.uses_detector else ("input", "prompts", "sam", "qa")
    if cfg.automatic.enabled:  # only then: runs made before the section existed resume as they did
        sections += ("automatic",)
    sections += ("video",)  # stride, keyframes, matching and chunks shape a video's rows as the sam keys do
    config = {s: dict(data[s]) for s in sections}
    for key in PERFORMANCE_ONLY:
        section, name = key.split(".")
        config.get(section, {}).pop(name, None)
    for key in ABSENT_WHEN_NULL:
        section, name = key.split(".")
        if config.get(section, {}).get(name, "set") is None:
            config[section].pop(name)
    config["sam"].pop("dtype", None)
    if dtype:
        config["sam"]["dtype"] = dtype
    config = _normalised_uris(config)
    weights = {name: m["sha256"] or f"random:{m.get('weights') or m.get('config')}" for name, m in models.items()}
    embedded = (((models.get("detector") or {}).get("classes") or {}).get("embeddings") or {}).get("sha256")
    if embedded:  # an open-vocabulary run's class embeddings, by content (text encoded again must give the same)
        weights["class_embeddings"] = embedded
    return _sealed(config, weights)


def _sealed(config: dict, weights: dict) -> dict:
    digest = hashlib.sha256(json.dumps({"config": config, "models": weights}, sort_keys=True).encode()).hexdigest()
    return {"sha256": digest, "config": config, "models": weights}


def _normalised_uris(config: dict) -> dict:
    """The input and manifest URIs with ``..``, ``.`` and trailing ``/`` resolved (a fingerprint's config)."""
    config = {section: dict(values) if isinstance(values, dict) else values for section, values in config.items()}
    for section, key in NORMALISED_URIS:
        value = (config.get(section) or {}).get(key)
        if isinstance(value, str) and value:
            config[section][key] = normalise_uri(value)
    return config


def comparable(fp: dict, dtype: bool = True) -> dict:
    """A fingerprint as it is compared: URIs normalised (also in run.json files written before they
    were), and without the dtype (``dtype=False``) to compare with one made before Ray was asked."""
    config = _normalised_uris(fp.get("config", {}))
    if not dtype:
        config.get("sam", {}).pop("dtype", None)
    return _sealed(config, fp.get("models", {}))


def without_dtype(fp: dict) -> dict:
    return comparable(fp, dtype=False)


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def differences(before: dict, now: dict) -> list[str]:
    """Human-readable ``key: that run -> now`` lines between two fingerprints."""
    old, new = _flat(before.get("config", {})), _flat(now["config"])
    lines = [f"{k}: {old.get(k, '(not set)')!r} -> {new.get(k, '(not set)')!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    for model, sha in now["models"].items():
        was = before.get("models", {}).get(model)
        if was != sha:
            lines.append(f"{model.replace('_', ' ') if model == 'class_embeddings' else model + ' weights'}: {str(was)[:23]} -> {str(sha)[:23]}")
    return lines or ["(the fingerprint differs)"]


class RunFolder:
    """``output.uri``: run.json, the done markers, and clean-up before a fresh or resumed run."""

    STATUSES = ("listing", "running", "finished", "failed")

    @classmethod
    def is_run_manifest(cls, manifest) -> bool:
        """Is this (parsed run.json) an autolabel run manifest? Its status, and its resume fingerprint
        or the config it ran with (input and output sections)."""
        if not isinstance(manifest, dict) or manifest.get("status") not in cls.STATUSES:
            return False
        fingerprint, config = manifest.get("fingerprint"), manifest.get("config")
        return (isinstance(fingerprint, dict) and "sha256" in fingerprint) or (
            isinstance(config, dict) and isinstance(config.get("input"), dict) and isinstance(config.get("output"), dict)
        )

    def __init__(self, cfg: RunConfig):
        self.uri = cfg.output.uri
        self.fs, path = url_to_fs(cfg.output.uri, **cfg.output.storage_options)
        try:
            self.path = normalised_path(self.fs, path)  # `..`, `.`, trailing `/`: one folder, one spelling
        except ValueError as exc:
            raise ConfigError(f"output.uri {self.uri}: {exc}") from None
        self.run_uri = self.fs.unstrip_protocol(self.path)
        self.location = redact_uri(self.run_uri)  # what run.json binds the run to

    def new_identity(self) -> dict:
        """run.json's binding of a new run to this folder: a run id and the folder's normalised URI.
        A run.json copied or moved elsewhere names another place, so it proves nothing there."""
        return {"run_id": uuid.uuid4().hex, "location": self.location}

    def path_to(self, *parts: str) -> str:
        return "/".join([self.path, *parts])

    def entries(self) -> list[str]:
        """Names of everything in the folder ([] when it is empty or does not exist)."""
        try:
            if not self.fs.exists(self.path):
                return []
            if not self.fs.isdir(self.path):
                raise ConfigError(f"output.uri {self.uri} is a file, not a folder; choose a folder (new or empty) for the run")
            return sorted(n.rstrip("/").rsplit("/", 1)[-1] for n in self.fs.ls(self.path, detail=False) if n.rstrip("/") != self.path)
        except OSError as exc:
            raise ConfigError(f"output.uri {self.uri} cannot be read: {getattr(exc, 'strerror', None) or exc}") from None

    def read_run(self) -> Optional[dict]:
        """run.json, if the folder holds an autolabel run; None when there is no run.json at all.
        A run.json that cannot be read or is not an autolabel run manifest is refused (ConfigError):
        such a folder is neither resumed nor cleared, --overwrite or not."""
        try:
            raw = self.fs.cat_file(self.path_to("run.json"))
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ConfigError(
                f"output.uri {self.uri}: cannot read run.json ({getattr(exc, 'strerror', None) or exc}), so it is not "
                "recognisably an autolabel run and is neither resumed nor replaced (--overwrite included); "
                "fix the access or choose another output.uri"
            ) from None
        try:
            manifest = json.loads(raw)
        except ValueError:
            manifest = None
        if not self.is_run_manifest(manifest):
            raise ConfigError(
                f"output.uri {self.uri} holds a run.json that is not an autolabel run manifest, so the folder is not "
                "an autolabel run and is neither resumed nor replaced (--overwrite included); choose another output.uri "
                "(a new or empty folder)"
            )
        return manifest

    def previous_run(self, overwrite: bool) -> Optional[dict]:
        """The run.json of a run already in the folder (None when the folder is new or empty, or when
        overwriting a run). Checked before any work: a folder that holds anything else (files and no
        run.json, or a run.json that is not an autolabel run's) is refused, even with ``overwrite``,
        because starting clean would have to delete what is not the run's; so is a run whose run.json
        was written for another place, or whose own folders hold something it did not write."""
        manifest = self.read_run()
        if manifest is None:
            others = self.entries()
            if others:
                found = [n for n in others if n in (*RUN_FOLDERS, "run.json")]
                what = f"holds run files ({', '.join(found)}) but" if found else "is not empty"
                shown = ", ".join(others[:8]) + (f" and {len(others) - 8} more" if len(others) > 8 else "")
                raise ConfigError(
                    f"output.uri {self.uri} {what} has no run.json, so it is not an autolabel run: it holds {shown}. "
                    "A run writes only into a new or empty folder, or resumes (or, with --overwrite, replaces) an "
                    "autolabel run there; --overwrite never clears other files. Choose another output.uri (a new folder)"
                )
            return None
        self.inventory(manifest, everything=overwrite)
        return None if overwrite else manifest

    def inventory(self, manifest: dict, everything: bool = True) -> Inventory:
        """The folder's files sorted into the run's own and the rest (ownership.run_inventory), after
        checking that run.json was written here; ConfigError (nothing touched) when something the
        run did not write is in the way."""
        self._check_bound(manifest)
        try:
            inventory = run_inventory(self.fs, self.path, manifest, everything)
        except OSError as exc:
            raise ConfigError(f"output.uri {self.uri} cannot be read: {getattr(exc, 'strerror', None) or exc}") from None
        if inventory.foreign:
            raise ConfigError(
                f"output.uri {self.uri} holds an autolabel run, but also {inventory.shown_foreign()}, which the run did not "
                f"write (its own folders {', '.join(RUN_DATA)} may hold only its files, and symlinks are never followed), "
                "so the run is neither resumed nor replaced (--overwrite included) and nothing was touched: move "
                "those away, or choose another output.uri"
            )
        return inventory

    def _check_bound(self, manifest: dict) -> None:
        """run.json names the place it was written to; a copy (or a moved folder) is not that run."""
        where = manifest.get("location")
        if where is None:
            return  # written before runs were bound to their folder: their files are recognised by name alone
        if where != self.location or not manifest.get("run_id"):
            raise ConfigError(
                f"output.uri {self.uri} holds a run.json written for {redact_uri(str(where))}, not for {self.location}: "
                "the folder is a copy, or was moved, so nothing in it is known to be that run's, and it is neither "
                "resumed nor replaced (--overwrite included); nothing was touched. Choose another output.uri, or "
                "remove the folder yourself"
            )

    def check_resumable(self, previous: dict, now: dict) -> None:
        before = previous.get("fingerprint")
        if not before:
            raise ConfigError(
                f"output.uri {self.uri} holds a run without a resume fingerprint (made by an older autolabel); "
                "choose another output.uri, or pass --overwrite (output.overwrite=true) to replace it"
            )
        if without_dtype(before)["sha256"] != without_dtype(now)["sha256"]:
            self._refuse(differences(without_dtype(before), without_dtype(now)))

    def check_same_dtype(self, previous: dict, now: dict) -> None:
        """Once the dtype SAM will run in is known: the shards done so far must have used the same
        (a run resumed on other hardware would otherwise mix float32 and bfloat16 masks)."""
        before = previous.get("fingerprint") or {}
        if "dtype" in before.get("config", {}).get("sam", {}) and comparable(before)["sha256"] != comparable(now)["sha256"]:
            self._refuse(differences(comparable(before), comparable(now)), hint="The shards done so far were segmented in another dtype: resume on "
                         "hardware like the first attempt's, or pass sam.dtype=<that dtype> to force it (bfloat16 needs CUDA); ")

    def _refuse(self, lines: list[str], hint: str = "") -> None:
        raise ConfigError(
            f"output.uri {self.uri} holds a run made with a different configuration or weights, so it cannot be resumed:\n  "
            + "\n  ".join(lines)
            + f"\n{hint}Rerun with that run's settings to resume it (they are in {self.run_uri}/run.json), choose another "
            "output.uri, or pass --overwrite (output.overwrite=true) to start clean."
        )

    def clear(self) -> None:
        """Remove the run in the folder, and exactly the run's own files (ownership.run_inventory):
        the listing, staged parts, committed shard files, done markers, the report's three files, the
        exports in ``exports/`` bound to their folder and this run's review decisions; then those
        folders once empty; run.json last. Anything else stays; something else inside the run's own
        folders refuses it (checked again here). A folder without run.json is cleared only when empty."""
        manifest = self.read_run()
        if manifest is None:
            if self.entries():
                raise ConfigError(f"output.uri {self.uri} is not empty and holds no autolabel run (no run.json); it is not cleared")
            return
        inventory = self.inventory(manifest)
        inventory.files.sort(key=lambda rel: rel == "run.json")  # an interrupted clear-up leaves a run.json to retry with
        removed = inventory.remove(self.fs)
        log.info("removed the earlier run in %s: %d files", self.run_uri, removed)

    def prepare(self, manifest: dict) -> None:
        """Start clean: remove a previous run (every check has passed by now; ``clear`` removes only
        the run's own files), create the folder and write run.json, which is also the proof that
        the folder can be written."""
        try:
            self.clear()
            self.fs.makedirs(self.path, exist_ok=True)
            self.write_manifest(manifest)
        except (OSError, OutputWriteError) as exc:
            raise ConfigError(f"output.uri {self.uri} cannot be written: {getattr(exc, 'strerror', None) or exc}") from None

    def write_manifest(self, manifest: dict) -> None:
        atomic_write(self.fs, self.path_to("run.json"), json.dumps(manifest, indent=2).encode())

    def write_class_embeddings(self, embeddings) -> None:
        """RUN/class_embeddings.npz: an open-vocabulary run's classes (a ``yoloe.ClassEmbeddings``, or
        None: nothing to write) in ultralytics' own format, to reuse (``detector.class_embeddings=``,
        ``YOLOE.load_prompt_embeddings``); run.json's record of them names it, so it is the run's own."""
        if embeddings is None:
            return
        try:
            atomic_write(self.fs, self.path_to(CLASS_EMBEDDINGS), embeddings.data)
        except OutputWriteError as exc:
            raise ConfigError(f"output.uri {self.uri} cannot be written: {exc}") from None

    def shard_ids(self) -> list[str]:
        names = self.fs.glob(self.path_to(SHARDS_DIR, "shard-*.parquet"))
        return sorted(n.rsplit("/", 1)[-1].removeprefix("shard-").removesuffix(".parquet") for n in names)

    def shard_uri(self, shard_id: str) -> str:
        return self.path_to(SHARDS_DIR, f"shard-{shard_id}.parquet")

    def done_shards(self) -> dict[str, dict]:
        """Shard id -> totals, from the done markers."""
        self.fs.invalidate_cache(self.path_to(DONE_DIR))
        paths = self.fs.glob(self.path_to(DONE_DIR, "shard-*.json"))
        markers = [json.loads(data) for data in self.fs.cat(paths).values()] if paths else []
        return {marker["shard_id"]: marker for marker in markers}

    def clean_unfinished(self, manifest: dict, pending: set[str]) -> int:
        """Before a resume: drop staged parts, half-committed shard files and temporary files, so
        what is redone cannot meet what was left. Only the run's own files (``inventory``); returns
        how many were removed."""
        inventory = self.inventory(manifest, everything=False)
        unfinished = Inventory(self.path, folders=[f for f in inventory.folders if f.split("/")[0] == STAGING_DIR])
        chunks = [rel.rpartition("/")[2] for rel in inventory.files if rel.rpartition("/")[0] == CHUNKS_DIR]
        unfinished.files.extend(f"{CHUNKS_DIR}/{name}" for name in unfinished_chunk_files(chunks, pending))  # whole chunks stay
        for rel in inventory.files:
            folder, _, name = rel.rpartition("/")
            if folder == CHUNKS_DIR:
                continue
            if folder.split("/")[0] == STAGING_DIR or name.startswith(".tmp-"):
                unfinished.files.append(rel)
            elif folder in RUN_FILE_NAMES and folder != SHARDS_DIR and RUN_FILE_NAMES[folder].fullmatch(name)["shard"] in pending:
                unfinished.files.append(rel)
        return unfinished.remove(self.fs)

    def clean_staging(self, manifest: dict) -> None:
        """After the last commit: the staging area's leftovers (only the run's own parts and folders;
        anything else there stays, and the next resume or --overwrite names it)."""
        inventory = run_inventory(self.fs, self.path, manifest, everything=False)
        leftovers = (STAGING_DIR, CHUNKS_DIR)  # every video is committed: its plan and chunks are done with
        staged = [rel for rel in inventory.files if rel.split("/")[0] in leftovers]
        Inventory(self.path, staged, [f for f in inventory.folders if f.split("/")[0] in leftovers]).remove(self.fs)
