"""The config's sections (``input``, ``output``, ``detector``, ``sam``, ``prompts``, ``ray``, ``qa``,
``automatic``, ``video``, ``report``): each key's type, default, allowed values and what it is
for (its ``description``, which docs/configuration.md repeats), and the checks of one section.
Checks across sections, loading and overrides are in ``pipeline/config/__init__.py``.
"""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from pipeline.io.credentials import CredentialError, merge_options, split_credentials

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")
MAX_IMAGE_PIXELS = 2**31 - 1  # masks.py and pycocotools count pixels in 32-bit integers (run counts, positions)


class ConfigError(ValueError):
    """A configuration problem the user must fix; the message says what and where."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ------------------------------------------------------------------ credentials inside URIs
# (pipeline/credentials.py): moved into storage options while the config is validated, so nothing
# after this point, workers included, ever sees a URI that carries them.


def _move_credentials(section: "_Section", field: str = "uri", query_to_params: bool = False, what: str = "") -> dict:
    """Take the credentials out of ``section.<field>`` into its ``storage_options``; returns them."""
    value = getattr(section, field)
    if not isinstance(value, str):
        return {}
    try:
        clean, moved = split_credentials(value, what or field, query_to_params)
    except CredentialError as exc:
        raise ValueError(str(exc)) from None
    if moved:
        object.__setattr__(section, field, clean)
        object.__setattr__(section, "storage_options", merge_options(moved, section.storage_options))
    return moved


def _clashing(moved: dict, given: dict) -> list[str]:
    """Option names (never values) that ``moved`` and ``given`` both set, to different values."""
    out = []
    for name, value in moved.items():
        if name == "headers" and isinstance(given.get("headers"), dict):
            out += [f"headers.{h}" for h, v in value.items() if h in given["headers"] and given["headers"][h] != v]
        elif name in given and given[name] != value:
            out.append(name)
    return out


class InputConfig(_Section):
    uri: str = Field("samples/images", description="Folder, glob, single image, tar shards or a manifest; any fsspec URL.")
    shard_size: int = Field(128, gt=0, description="Images per work unit (folders and manifests; a tar is one unit).")
    extensions: list[str] = Field(list(IMAGE_EXTENSIONS), description="Image file suffixes to list.")
    storage_options: dict[str, Any] = Field(default_factory=dict)
    format: Literal["auto", "images", "tar", "manifest"] = Field(
        "auto", description="auto: .tar or {a..b} brace pattern -> tar; .jsonl/.csv/.parquet -> manifest; else images."
    )
    max_pixels: int = Field(
        89_478_485, gt=0, description="Images with more pixels become too_large error rows (decompression-bomb guard); "
        "at most 2147483647 (2**31 - 1).",
    )

    @field_validator("max_pixels")
    @classmethod
    def _fits_rle_counts(cls, value: int) -> int:
        if value > MAX_IMAGE_PIXELS:
            raise ValueError(f"at most {MAX_IMAGE_PIXELS} (2**31 - 1): a mask's pixel positions and COCO RLE run counts "
                             "are 32-bit integers (pycocotools, and the run boundaries found on the GPU), so a larger "
                             "image cannot be encoded; tile such images first")
        return value

    @field_validator("extensions")
    @classmethod
    def _dotted_lowercase(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("must name at least one suffix, e.g. [.jpg, .png]")
        return [("." + s.lstrip(".")).lower() for s in value]

    _uri_credentials: dict = PrivateAttr(default_factory=dict)  # what input.uri carried (to check prompts.manifest's against)

    @model_validator(mode="after")
    def _credentials_to_storage_options(self) -> "InputConfig":
        self._uri_credentials = _move_credentials(self, what="input.uri")
        return self


class OutputConfig(_Section):
    uri: str = Field("runs/sample", description="Run folder (local path or fsspec URL).")
    storage_options: dict[str, Any] = Field(default_factory=dict)
    overwrite: bool = Field(False, description="Replace an existing run in output.uri.")

    @field_validator("uri")
    @classmethod
    def _shared_filesystem(cls, value: str) -> str:
        if value.startswith("memory://"):
            raise ValueError(
                "memory:// lives inside one process, but Ray workers write the output; "
                "use a local folder or an object store"
            )
        return value

    @model_validator(mode="after")
    def _credentials_to_storage_options(self) -> "OutputConfig":
        _move_credentials(self, what="output.uri")
        return self


class DetectorConfig(_Section):
    weights: str = Field(
        "yolov8n.pt",
        description="YOLO detect weights: official name (fetched into checkpoints/), .pt path or URL, "
        "or a model .yaml (random weights).",
    )
    conf: float = Field(0.25, ge=0.0, le=1.0)
    iou: float = Field(0.7, ge=0.0, le=1.0)
    classes: Optional[Union[list[int], list[str]]] = Field(
        None, description="Class ids to keep (a closed-set YOLO), or class names (a YOLOE / YOLO-World model: "
        "the classes to find, their ids in this order); null keeps the model's own classes.",
    )
    max_det: int = Field(300, gt=0)
    imgsz: int = Field(640, gt=0)
    batch_size: int = Field(8, gt=0, description="Images per detector call.")
    decode_ahead_mp: Optional[float] = Field(
        None, gt=0, description="Megapixels of decoded images a detector actor holds at once (at least one image, "
        "however large); null: 12 x batch_size (a batch of 12-MP photos).",
    )
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    class_embeddings: Optional[str] = Field(
        None, description="Class embeddings of a YOLOE / YOLO-World model: an .npz as ultralytics' save_prompt_embeddings "
        "writes it (path or fsspec URL); its names are the classes, and no text encoder is needed.",
    )
    visual_prompts: Optional[str] = Field(
        None, description="Classes by example for a YOLOE model: a JSONL of reference images with boxes and class names "
        "(path or fsspec URL).",
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options for weights, class_embeddings and visual_prompts given as URLs "
        "(credentials inside the URL move here).",
    )

    @field_validator("classes", mode="before")
    @classmethod
    def _comma_separated(cls, value):
        """``detector.classes=forklift,pallet`` (a YAML string) is the list it spells; ids stay ids."""
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",")]
            value = [int(v) if v.isdigit() else v for v in value]
        elif isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if isinstance(value, list) and {type(v) for v in value} == {int, str}:
            raise ValueError("class ids (a closed-set YOLO) or class names (YOLOE / YOLO-World), not both")
        return value

    @field_validator("classes")
    @classmethod
    def _ids_or_names(cls, value):
        if value is None:
            return value
        if not value:
            raise ValueError("must name at least one class (null keeps all)")
        if isinstance(value[0], int) and any(c < 0 for c in value):
            raise ValueError("class ids are >= 0")
        if isinstance(value[0], str) and (len(set(value)) != len(value) or any(not c.strip() for c in value)):
            raise ValueError("class names must be distinct and non-empty")
        return value

    @property
    def class_names_given(self) -> bool:
        """``classes`` names classes (an open-vocabulary model) rather than keeping ids."""
        return bool(self.classes) and isinstance(self.classes[0], str)

    @field_validator("imgsz")
    @classmethod
    def _stride_multiple(cls, value: int) -> int:
        if value % 32:
            raise ValueError(f"must be a multiple of 32 (YOLO's stride), e.g. {max(32, value // 32 * 32)}")
        return value

    @model_validator(mode="after")
    def _one_way_to_define_classes(self) -> "DetectorConfig":
        if self.class_embeddings and self.visual_prompts:
            raise ValueError("detector.class_embeddings and detector.visual_prompts both define the classes; give one")
        given = "class_embeddings" if self.class_embeddings else "visual_prompts" if self.visual_prompts else None
        if given and self.classes is not None and not self.class_names_given:
            raise ValueError(f"detector.classes: with detector.{given}, classes are names (their order sets the ids), "
                             f"not ids {self.classes}")
        return self

    @model_validator(mode="after")
    def _credentials_to_storage_options(self) -> "DetectorConfig":
        _move_credentials(self, "weights", query_to_params=True, what="detector.weights")
        for key in ("class_embeddings", "visual_prompts"):  # read with the same storage options as the weights
            value = getattr(self, key)
            if not isinstance(value, str):
                continue
            try:
                clean, moved = split_credentials(value, f"detector.{key}")
            except CredentialError as exc:
                raise ValueError(str(exc)) from None
            if moved and _clashing(moved, self.storage_options):
                raise ValueError(f"detector.{key} carries credentials that differ from detector.storage_options' (or "
                                 "detector.weights'); they are read with one set of detector.storage_options: give them once, there")
            if moved:
                object.__setattr__(self, key, clean)
                object.__setattr__(self, "storage_options", merge_options(moved, self.storage_options))
        return self


class SamConfig(_Section):
    size: Literal["tiny", "small", "base_plus", "large"] = "tiny"
    checkpoint: str = Field(
        "auto",
        description="auto (official file in checkpoints/, fetched if missing), a local path, an fsspec "
        "URL, a Hugging Face id such as facebook/sam2.1-hiera-tiny, or the word random.",
    )
    image_size: int = Field(1024, gt=0, description="SAM input resolution; 1024 is what it was trained at.")
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    multimask: Union[bool, Literal["auto"]] = Field(
        "auto", description="3 candidates per prompt: auto (only for a lone point, as SAM 2 advises), true, false."
    )
    candidates: Literal["best", "all"] = Field("best", description="With multimask: keep the best candidate, or all three ranked.")
    batch_size: int = Field(8, gt=0, description="Images per image-encoder pass (one shape on a GPU: the last batch is padded).")
    box_chunk: int = Field(64, gt=0, description="Prompts per mask-decoder call, gathered across the images of a batch (bounds memory).")
    decode_ahead_mp: Optional[float] = Field(
        None, gt=0, description="Megapixels of decoded images a SAM actor holds at once, in the encoder and decoded ahead "
        "(at least one image, however large); null: 24 x batch_size (two encoder batches of 12-MP photos).",
    )
    compile: bool = Field(False, description="torch.compile the image encoder (max-autotune; minutes at start, faster after).")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options for a checkpoint given as a URL (credentials inside the URL move here)."
    )

    @field_validator("image_size")
    @classmethod
    def _patch_multiple(cls, value: int) -> int:
        if value % 64:
            raise ValueError("must be a multiple of 64 (SAM 2's backbone strides), e.g. 256, 512, 1024")
        return value

    @model_validator(mode="after")
    def _credentials_to_storage_options(self) -> "SamConfig":
        _move_credentials(self, "checkpoint", query_to_params=True, what="sam.checkpoint")
        return self


class PromptsConfig(_Section):
    source: Literal["detector", "manifest", "both"] = Field(
        "detector", description="detector boxes, prompts from prompts.manifest, or both."
    )
    manifest: Optional[str] = Field(None, description="Prompt manifest (.jsonl or .parquet), local path or fsspec URL.")
    allow_any_uri: bool = Field(
        False, description="Let manifest lines name images and mask files outside the manifest's folder and input.uri "
        "(absolute paths, ../, other hosts). Off: such a manifest is refused (a mask path: that object's error row).",
    )


class RayConfig(_Section):
    address: Optional[str] = Field(None, description="Cluster address; null uses RAY_ADDRESS or starts Ray locally.")
    num_cpus: Optional[int] = Field(None, gt=0, description="CPUs for a locally started Ray (null: all).")
    gpus: Union[int, Literal["auto"]] = Field(
        "auto", description="GPUs the job may use at most: auto = as many as the cluster has or adds (the pools grow as "
        "GPU nodes join), or a number. SAM runs on CPUs only when sam.device=cpu, or on a local Ray without GPUs.",
    )
    gpu_wait_s: int = Field(600, gt=0, description="How long to wait for the first GPU actors (an autoscaler adding GPU nodes), "
                            "and for GPUs to come back when the cluster loses all of them mid-run, before failing (resumably).")
    detector_actors: Optional[int] = Field(None, gt=0, description="Fixed detector actor count (null: one beside each SAM actor).")
    sam_actors: Optional[int] = Field(None, gt=0, description="Fixed SAM actor count (null: one per GPU, growing with the cluster; 1 on CPU).")
    max_image_crashes: int = Field(
        3, gt=0, description="Worker deaths on one image before it becomes a worker_crash error row instead of being retried."
    )
    task_retries: int = Field(3, ge=0, description="Extra re-runs of a decode or write task whose worker died (actors restart without limit).")


    @field_validator("gpus")
    @classmethod
    def _positive(cls, value):
        if value != "auto" and value < 1:
            raise ValueError("must be auto or at least 1 (to run SAM on CPUs, set sam.device=cpu)")
        return value


class QaConfig(_Section):
    """Quality control: metrics on every mask (always), flags from these thresholds, and the
    clean-up and de-duplication steps, which are off by default (they change masks and rows)."""

    enabled: bool = Field(True, description="Quality metrics and flags for every mask; false leaves those columns null.")
    min_mask_score: float = Field(0.7, ge=0.0, le=1.0, description="Flag low_score below this mask_score (SAM's predicted IoU).")
    min_stability: float = Field(0.85, ge=0.0, le=1.0, description="Flag unstable below this stability score.")
    min_box_iou: float = Field(0.5, ge=0.0, le=1.0, description="Flag leaks_box when the mask's box and the prompt box overlap less (IoU).")
    max_outside_box: float = Field(0.2, ge=0.0, le=1.0, description="Flag leaks_box when more than this share of the mask lies outside the prompt box.")
    max_regions: int = Field(3, gt=0, description="Flag fragmented when the mask has more connected regions.")
    min_area: int = Field(32, ge=0, description="Flag tiny below this many pixels.")
    remove_islands_below: int = Field(0, ge=0, description="Clean-up: drop mask regions smaller than this (pixels; 0 = off).")
    fill_holes_below: int = Field(0, ge=0, description="Clean-up: fill holes smaller than this (pixels; 0 = off).")
    dedup: Literal["off", "iou", "ios"] = Field(
        "off", description="Mark duplicate masks within an image: by mask IoU, or intersection over the smaller mask (ios).")
    dedup_threshold: float = Field(0.8, gt=0.0, le=1.0, description="Overlap at which the lower-scored mask is a duplicate.")
    dedup_class_aware: bool = Field(True, description="Only masks of the same class can be duplicates of each other.")


class AutomaticConfig(_Section):
    """Segment everything (sam/automatic.py) instead of the detector: ``SAM2AutomaticMaskGenerator``'s
    arguments and defaults, bounded as ``AutomaticArgs`` bounds them (a test keeps the two in step)."""

    enabled: bool = Field(False, description="Every mask SAM finds from a point grid, no detector (source=automatic, no class).")
    points_per_side: int = Field(32, ge=1, description="Grid points along one side of the image (crop layer 0).")
    points_per_batch: int = Field(64, ge=1, description="Points per mask-decoder call (memory, not masks).")
    pred_iou_thresh: float = Field(0.8, ge=0.0, le=1.0, description="Keep masks whose predicted IoU is above this.")
    stability_score_thresh: float = Field(0.95, ge=0.0, le=1.0, description="Keep masks with at least this stability score.")
    stability_score_offset: float = Field(1.0, ge=0.0, description="Logit offset the stability score is measured at.")
    box_nms_thresh: float = Field(0.7, ge=0.0, le=1.0, description="Box IoU above which a crop's lower-scored mask is dropped.")
    crop_n_layers: int = Field(0, ge=0, description="Crop layers (layer n: 4**n overlapping crops, segmented too).")
    crop_nms_thresh: float = Field(0.7, ge=0.0, le=1.0, description="Box IoU of the NMS across crops (smaller crops win).")
    crop_overlap_ratio: float = Field(512 / 1500, ge=0.0, lt=1.0, description="How much neighbouring crops overlap.")
    crop_n_points_downscale_factor: int = Field(1, ge=1, description="Each crop layer has this many times fewer points per side.")
    min_mask_region_area: int = Field(0, ge=0, description="Fill holes / drop islands up to this many low-res pixels (0 = off).")
    multimask_output: bool = Field(True, description="Three candidates per point (else one).")

    @model_validator(mode="after")
    def _points_in_every_layer(self) -> "AutomaticConfig":
        if int(self.points_per_side / self.crop_n_points_downscale_factor ** self.crop_n_layers) < 1:
            raise ValueError(f"automatic.points_per_side={self.points_per_side} leaves no points in crop layer {self.crop_n_layers} "
                             f"(automatic.crop_n_points_downscale_factor={self.crop_n_points_downscale_factor} divides it per layer)")
        return self


class VideoConfig(_Section):
    """Video files (issue 19): how frames are kept and how objects are tracked through them
    (io/video.py, sam/video.py, sam/tracks.py, stages/track.py)."""

    stride: int = Field(1, ge=1, description="Keep every Nth decoded frame.")
    max_frames: Optional[int] = Field(None, ge=1, description="At most this many kept frames per video (null: all).")
    detect_every: int = Field(5, ge=1, description="Detector-driven tracking: run the detector on every Nth kept frame (keyframes).")
    match_iou: float = Field(0.5, gt=0.0, le=1.0, description="Mask IoU at which a keyframe detection continues a live track (and neighbouring chunks' tracks are joined).")
    max_missing: int = Field(30, ge=1, description="A track whose mask is empty this many kept frames in a row ends.")
    min_track_frames: int = Field(3, ge=1, description="Tracks with at least this many frames count as unique objects (videos.class_counts).")
    reverse: bool = Field(False, description="Prompted tracking also propagates backwards from prompts after the first frame.")
    offload_state_to_cpu: bool = Field(False, description="Keep SAM 2's tracking state in host memory (slower, less GPU memory).")
    count_line: Optional[list[float]] = Field(
        None, description="[x1, y1, x2, y2] in frame pixels: count the tracks crossing this line, in and out, per class "
                          "(videos.line_in, videos.line_out; sam/crossings.py). null: no line.")
    chunk_frames: Optional[int] = Field(None, ge=2, description="Detector-driven tracking: split a video of more kept frames into chunks "
                                        "of this many, tracked apart (one unit of work each) and joined (null: one chunk per video).")
    chunk_overlap: int = Field(10, ge=1, description="Kept frames two neighbouring chunks share: their tracks are joined by mask IoU there.")

    @field_validator("count_line", mode="before")
    @classmethod
    def _two_points(cls, value):
        import math

        if value is None:
            return None
        if not isinstance(value, (list, tuple)) or len(value) != 4 or any(
                isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in value):
            raise ValueError(f"must be four numbers [x1, y1, x2, y2] (pixels of the frame), got {value!r}")
        if (value[0], value[1]) == (value[2], value[3]):
            raise ValueError(f"the line's two points must differ, got {value!r}")
        return [float(v) for v in value]

    @model_validator(mode="after")
    def _chunks_overlap_and_advance(self) -> "VideoConfig":
        if self.chunk_frames is not None and self.chunk_frames < self.chunk_overlap + self.detect_every:
            raise ValueError(f"video.chunk_frames={self.chunk_frames} must be at least video.chunk_overlap + video.detect_every "
                             f"({self.chunk_overlap} + {self.detect_every}): chunks start on keyframes and share chunk_overlap frames")
        return self


class ReportConfig(_Section):
    enabled: bool = Field(True, description="Write RUN/report/ (report.html, counts.csv, summary.json) when a run finishes.")
    gallery: int = Field(12, ge=0, description="Sample images drawn with their masks in the report.")
    group_by: str = Field("folder", description="Images column to group counts by; folder = parent folder of the URI.")
