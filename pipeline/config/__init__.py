"""Typed run configuration: defaults, YAML files and ``key=value`` overrides, validated up front.

Every mistake in a config must surface here, before Ray starts or any image is read, with the
dotted key and what is allowed. The pydantic models are the single source of defaults;
``configs/default.yaml`` mirrors them for people to read and copy (a test keeps the two equal).
The sections' keys are in ``sections.py``; here are the whole config, its cross-section checks,
loading, overrides and redaction.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from pipeline.config.sections import (
    IMAGE_EXTENSIONS, MAX_IMAGE_PIXELS, AutomaticConfig, ConfigError, DetectorConfig, InputConfig, OutputConfig, PromptsConfig,
    QaConfig, RayConfig, ReportConfig, SamConfig, VideoConfig, _clashing, _Section,
)
from pipeline.io.credentials import REDACTED, CredentialError, merge_options, redact, redact_text, redact_uri, split_credentials

__all__ = [  # imported from here by the rest of the package: the sections, and the credential helpers it uses
    "IMAGE_EXTENSIONS", "MAX_IMAGE_PIXELS", "AutomaticConfig", "ConfigError", "DetectorConfig", "InputConfig", "OutputConfig",
    "PromptsConfig", "QaConfig", "RayConfig", "ReportConfig", "SamConfig", "VideoConfig", "RunConfig", "redact", "redact_text",
    "redact_uri", "load_config", "allowed_keys", "parse_override", "redacted_config", "storage_option_sets", "uses_random_weights",
]


class RunConfig(_Section):
    input: InputConfig = Field(default_factory=InputConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    detector: DetectorConfig = Field(default_factory=DetectorConfig)
    sam: SamConfig = Field(default_factory=SamConfig)
    prompts: PromptsConfig = Field(default_factory=PromptsConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    qa: QaConfig = Field(default_factory=QaConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    automatic: AutomaticConfig = Field(default_factory=AutomaticConfig)
    video: VideoConfig = Field(default_factory=VideoConfig)

    @model_validator(mode="after")
    def _manifest_matches_source(self) -> "RunConfig":
        if self.prompts.source != "detector" and not self.prompts.manifest:
            raise ValueError(f"prompts.manifest: required when prompts.source={self.prompts.source}")
        if self.prompts.source == "detector" and self.prompts.manifest:
            raise ValueError("prompts.manifest is set but prompts.source=detector ignores it; set prompts.source=manifest or both")
        return self

    @model_validator(mode="after")
    def _automatic_replaces_the_detector(self) -> "RunConfig":
        if self.automatic.enabled and self.prompts.source == "both":
            raise ValueError("automatic.enabled: segment-everything replaces the detector, so prompts.source=both (detector "
                             "boxes and manifest prompts) cannot apply; use prompts.source=manifest to add the manifest's "
                             "prompts to the automatic masks, or prompts.source=detector for the automatic masks alone")
        return self

    @model_validator(mode="after")
    def _manifest_credentials_to_input_options(self) -> "RunConfig":
        """The manifest, and the images and masks it names, are read with ``input.storage_options``:
        credentials inside ``prompts.manifest`` move there (never into the image URIs resolved
        against it). Credentials that disagree with those already there are refused."""
        if not self.prompts.manifest:
            return self
        try:
            clean, moved = split_credentials(self.prompts.manifest, "prompts.manifest")
        except CredentialError as exc:
            raise ValueError(str(exc)) from None
        if not moved:
            return self
        given = self.input.storage_options
        clash = _clashing(moved, given)
        other_kind = self.input._uri_credentials and set(self.input._uri_credentials) != set(moved)
        if clash or other_kind:
            raise ValueError(
                "prompts.manifest carries credentials that differ from input.uri's or input.storage_options' "
                f"({', '.join(clash) or 'another kind of storage'}); the manifest and the images are read with one set of "
                "input.storage_options: give the credentials once, there"
            )
        object.__setattr__(self.prompts, "manifest", clean)
        object.__setattr__(self.input, "storage_options", merge_options(moved, given))
        return self

    @property
    def uses_detector(self) -> bool:
        """The detector runs (and its weights are needed); never with ``automatic.enabled``."""
        return self.prompts.source in ("detector", "both") and not self.automatic.enabled


URI_KEYS = ("input.uri", "output.uri", "prompts.manifest", "sam.checkpoint", "detector.weights", "detector.class_embeddings",
            "detector.visual_prompts")
STORAGE_OPTION_KEYS = ("input.storage_options", "output.storage_options", "sam.storage_options", "detector.storage_options")


def storage_option_sets(cfg: RunConfig) -> list[dict]:
    """Every set of storage options of a config (their values are what ``redact`` hides)."""
    return [cfg.input.storage_options, cfg.output.storage_options, cfg.sam.storage_options, cfg.detector.storage_options]


def _allowed_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys += _allowed_keys(annotation, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def allowed_keys() -> list[str]:
    """Every dotted key a config file or override may set."""
    return _allowed_keys(RunConfig)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """``detector.conf=0.4`` -> ("detector.conf", 0.4); values are parsed as YAML scalars/lists."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not key=value (e.g. detector.conf=0.4)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if key not in allowed_keys() and not any(key.startswith(k + ".") for k in STORAGE_OPTION_KEYS):
        raise ConfigError(_unknown_key_message(key))
    if key in URI_KEYS:  # exactly as typed: YAML would turn a password holding ": " or " #" into something else
        return key, None if raw.strip() in ("null", "~") else raw
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        if ".storage_options" in key:  # a credential: never echoed
            raise ConfigError(f"{key}: cannot parse the value (not shown: storage options may hold credentials)") from None
        raise ConfigError(redact_text(f"{key}: cannot parse value '{raw}': {exc}")) from None
    if isinstance(value, (dict, list)) or value is None or isinstance(value, (int, float, bool)):
        return key, value
    return key, raw  # keep strings exactly as typed (e.g. a URL with ':' in it)


def _unknown_key_message(key: str) -> str:
    section = key.split(".")[0]
    same_section = [k for k in allowed_keys() if k.startswith(section + ".")]
    hint = same_section or allowed_keys()
    return f"unknown config key '{key}'; allowed keys: {', '.join(hint)}"


def _format_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            lines.append(_unknown_key_message(key))
            continue
        given = err.get("input")
        # a storage option's value is never shown; any other value without the credentials of URIs in it
        hidden = isinstance(given, (dict, BaseModel)) or "storage_options" in key
        shown = "" if hidden else f" (got {redact_text(repr(given))})"
        msg = err["msg"].removeprefix("Value error, ")
        named = not key or msg.startswith(f"{key}.")  # a section's check that names its key itself
        lines.append(f"{msg}{shown}" if named else f"{key}: {msg}{shown}")
    return "invalid config:\n  " + "\n  ".join(lines)


def load_config(path: Optional[str | Path] = None, overrides: list[str] = ()) -> RunConfig:
    """Defaults <- YAML file <- key=value overrides, validated as one. Raises ConfigError."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections (input:, output:, ...)")
        tree = loaded
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(tree, key, value)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc)) from None


def redacted_config(cfg: RunConfig) -> dict:
    """The config as run, fit for run.json, logs and reports: storage options' values replaced and
    credentials inside URIs (``user:password@``, signed query strings) removed (they were moved
    into the storage options when the config was read; this is the second line of defence)."""
    data = cfg.model_dump(mode="json")
    for dotted in STORAGE_OPTION_KEYS:
        section = dotted.split(".")[0]
        data[section]["storage_options"] = {k: REDACTED for k in data[section]["storage_options"]}
    for dotted in URI_KEYS:
        section, name = dotted.split(".")
        data[section][name] = redact_uri(data[section][name])
    return data


def uses_random_weights(cfg: RunConfig) -> bool:
    return cfg.sam.checkpoint == "random" or (cfg.uses_detector and cfg.detector.weights.endswith((".yaml", ".yml")))
