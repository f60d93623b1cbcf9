"""Video tracking with SAM 2's own video predictor, in bounded memory for any video length.

sam2's ``SAM2VideoPredictor`` does the tracking (``init_state``, ``add_new_points_or_box``,
``add_new_mask``, ``propagate_in_video``); this module changes only what it must:

- Frames. sam2's loader decodes and keeps every frame up front (12 MiB per frame at 1024).
  ``FrameSource`` is what ``inference_state["images"]`` indexes instead: it decodes on demand
  (``pipeline.io.video``) and keeps a small LRU. It preprocesses exactly as sam2's video loader
  does (Pillow's default resize of the uint8 frame to a square, /255, minus mean, over std), which
  is not the image predictor's ``SAM2Transforms``: masks equal sam2's own calls on the same RGB.
- Memory. Every tracked frame leaves its memory features in the state and nothing frees them
  (sam2 #196, #264). After each frame, non-conditioning outputs that sam2 can no longer read are
  dropped, as ultralytics' ``SAM2VideoPredictor._prune_non_cond_memory`` does, but with a window
  of ``max(num_maskmem * memory stride, max_obj_ptrs_in_encoder)`` frames (ultralytics keeps
  only ``num_maskmem``, and so changes the object pointers sam2 attends to): pruned tracking gives
  the same masks as unpruned. Conditioning frames in attention are capped
  (``max_cond_frames_in_attn``); ``offload_state_to_cpu`` keeps the state in host memory.
- Pitfalls of sam2 1.1.0. ``clear_non_cond_mem_around_input=True`` calls an undefined method: it
  stays False. An object prompted after the frame tracking starts from has no object pointer
  there, so its memory is all bfloat16 and fp32 attention fails (on CPU, where there is no
  autocast): a pre-hook gives the memory attention its memory in the features' dtype (the same
  values a mixed bf16/fp32 concatenation promotes to). Without the compiled ``sam2._C`` hole
  filling is skipped with a warning per frame; the predictor is told to skip it silently.

Frame numbers here are positions in the ``FrameSource`` (the kept frames); the source maps them
to decoded frame indices and times.
"""
from __future__ import annotations

import importlib
import threading
from collections import OrderedDict
from typing import Callable, Iterator, NamedTuple, Optional, Sequence

import numpy as np

from pipeline.io.video import VideoFrame, iter_frames, kept_count, probe
from pipeline.models.weights import SamWeights
from pipeline.sam.model import autocast, resolve_dtype

IMG_MEAN, IMG_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # load_video_frames' defaults
_INIT_LOCK = threading.Lock()  # init_state reads a module global that is swapped for the source


def build_video_predictor(weights: SamWeights, image_size: int = 1024, device="cpu", max_cond_frames_in_attn: int = 4):
    """``build_sam2_video_predictor`` from the size table's config and resolved checkpoint (the
    same as for images; ``weights.path=None``: random weights), at ``image_size``, in eval mode."""
    from sam2.build_sam import build_sam2_video_predictor

    overrides = [] if image_size == 1024 else [f"++model.image_size={image_size}"]
    predictor = build_sam2_video_predictor(weights.config, weights.path, device=str(device), mode="eval",
                                           hydra_overrides_extra=overrides)
    predictor.max_cond_frames_in_attn = max_cond_frames_in_attn
    predictor.clear_non_cond_mem_around_input = False
    try:
        importlib.import_module("sam2._C")  # hole filling needs it; without it sam2 warns and skips
    except ImportError:
        predictor.fill_hole_area = 0
    predictor.memory_attention.register_forward_pre_hook(_memory_in_feature_dtype, with_kwargs=True)
    return predictor


def _memory_in_feature_dtype(module, args, kwargs):
    import torch

    memory, curr = kwargs.get("memory"), kwargs.get("curr")
    if memory is None or curr is None or torch.is_autocast_enabled(memory.device.type):
        return None
    dtype = (curr[0] if isinstance(curr, (list, tuple)) else curr).dtype
    if memory.dtype == dtype:
        return None
    return args, {**kwargs, "memory": memory.to(dtype), "memory_pos": kwargs["memory_pos"].to(dtype)}


class FrameSource:
    """Frames ``0 .. num_frames - 1`` of a video for ``inference_state["images"]``, decoded on demand.

    ``open_frames(i)`` yields the ``VideoFrame``s from position ``i`` on. Going forward the
    decoder just continues; going back (the reverse pass) it is reopened ``cache_frames`` before
    the frame asked for, so a backward sweep decodes each block once (from the file's start:
    O(n^2 / cache_frames) decoded frames; a seek would make it O(n)). The cache holds the resized
    uint8 frames (3 bytes a pixel at ``image_size``^2) and normalises on access.

    ``keep_rgb(i)`` True: frame ``i``'s full RGB is kept when it is decoded until ``rgb(i)`` takes
    it (the detector's keyframes), so one decode serves both the tracker and the detector.
    """

    def __init__(self, open_frames: Callable[[int], Iterator[VideoFrame]], num_frames: int, image_size: int,
                 cache_frames: int = 16, start: int = 0, stride: int = 1, keep_rgb: Optional[Callable[[int], bool]] = None):
        if num_frames < 1:
            raise ValueError("a FrameSource needs at least one frame")
        import torch

        self.open_frames, self.num_frames, self.image_size = open_frames, num_frames, image_size
        self.cache_frames = max(1, cache_frames)
        self.start, self.stride = start, stride  # position i is decoded frame start + i * stride
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._frames: Optional[Iterator[VideoFrame]] = None
        self._next = 0  # position of the next frame self._frames yields
        self._mean = torch.tensor(IMG_MEAN, dtype=torch.float32)[:, None, None]
        self._std = torch.tensor(IMG_STD, dtype=torch.float32)[:, None, None]
        self._times: OrderedDict[int, float] = OrderedDict()  # position -> time_s, the latest decoded
        self.keep_rgb = keep_rgb
        self._rgb: OrderedDict[int, np.ndarray] = OrderedDict()  # kept full frames, until taken
        first = self._fill(0)
        self.height, self.width = first.rgb.shape[:2]
        self.decodes = 1  # how many times the video was opened (the cost of going back)

    @classmethod
    def from_video(cls, source, image_size: int, stride: int = 1, max_frames: Optional[int] = None, start: int = 0,
                   stop: Optional[int] = None, max_pixels: Optional[int] = None, storage_options: Optional[dict] = None,
                   num_frames: Optional[int] = None, cache_frames: int = 16,
                   keep_rgb: Optional[Callable[[int], bool]] = None) -> "FrameSource":
        """The frames ``iter_frames`` keeps from a video file or URL; ``num_frames`` is counted
        (``probe(count=True)``: demuxing, no decoding) when not given."""
        if num_frames is None:
            total = probe(source, storage_options, max_pixels, count=True).frames
            num_frames = kept_count(total, stride, max_frames, start, stop)

        def open_frames(i: int) -> Iterator[VideoFrame]:
            return iter_frames(source, stride=stride, max_frames=num_frames - i, start=start + i * stride, stop=stop,
                               max_pixels=max_pixels, storage_options=storage_options)

        return cls(open_frames, num_frames, image_size, cache_frames, start, stride, keep_rgb)

    def __len__(self) -> int:
        return self.num_frames

    def __getitem__(self, i: int):
        """Frame ``i`` as sam2's loader makes it: (3, S, S) float32, normalised."""
        import torch

        if not 0 <= i < self.num_frames:
            raise IndexError(f"frame {i} is outside 0..{self.num_frames - 1}")
        small = self._cache.get(i)
        if small is None:
            small = self._fill(i).small
        self._cache.move_to_end(i)
        img = torch.from_numpy(small / 255.0).permute(2, 0, 1).float()
        img -= self._mean
        img /= self._std
        return img

    def rgb(self, i: int) -> np.ndarray:
        """Frame ``i`` as decoded (HxWx3 uint8): the copy ``keep_rgb`` kept, else decoded again."""
        kept = self._rgb.pop(i, None)
        return kept if kept is not None else self._fill(i).rgb

    def decoded_index(self, i: int) -> int:
        return self.start + i * self.stride

    def time_s(self, i: int) -> Optional[float]:
        """Presentation time of frame ``i`` if it was decoded recently (a tracked frame just was)."""
        return self._times.get(i)

    def kept_index(self, decoded: int) -> int:
        """The position of decoded frame ``decoded`` (a ValueError if it is not a tracked frame)."""
        i, off = divmod(decoded - self.start, self.stride)
        if off or not 0 <= i < self.num_frames:
            raise ValueError(f"decoded frame {decoded} is not one of the tracked frames")
        return i

    class _Filled(NamedTuple):
        rgb: np.ndarray
        small: np.ndarray

    def _resize(self, rgb: np.ndarray) -> np.ndarray:
        """sam2's ``_load_img_as_tensor``: Pillow's resize (its default filter) of the uint8 frame."""
        from PIL import Image

        return np.array(Image.fromarray(rgb).resize((self.image_size, self.image_size)))

    def _fill(self, i: int) -> "_Filled":
        """Decode up to frame ``i``, caching it and the frames just before it."""
        if self._frames is None or i < self._next:
            first = max(0, i - self.cache_frames + 1) if i else 0
            if self._frames is not None:
                self._frames.close()
                self.decodes += 1
            self._frames, self._next = self.open_frames(first), first
        while True:
            frame = next(self._frames, None)
            if frame is None:
                raise IndexError(f"the video ended before frame {i} ({self._next} frames)")
            pos, self._next = self._next, self._next + 1
            self._times[pos] = frame.time_s
            if len(self._times) > 4 * self.cache_frames:
                self._times.popitem(last=False)
            if self.keep_rgb is not None and self.keep_rgb(pos):
                self._rgb[pos] = frame.rgb
                while len(self._rgb) > 2:  # one is taken before the next is decoded: never more than a couple
                    self._rgb.popitem(last=False)
            if pos > i - self.cache_frames:
                small = self._cache[pos] = self._resize(frame.rgb)
                while len(self._cache) > self.cache_frames:
                    self._cache.popitem(last=False)
            if pos == i:
                return self._Filled(frame.rgb, small)

    def close(self) -> None:
        if self._frames is not None:
            self._frames.close()
            self._frames = None
        self._cache.clear()
        self._times.clear()
        self._rgb.clear()


class ObjectPrompt(NamedTuple):
    """One object's prompt on one frame (a position in the FrameSource): a box, points, or a mask."""
    obj_id: int
    frame: int
    box: Optional[Sequence[float]] = None  # x0, y0, x1, y1 in pixels of the original frame
    points: Optional[Sequence[Sequence[float]]] = None  # [[x, y], ...] in pixels
    point_labels: Optional[Sequence[int]] = None  # 1 foreground, 0 background
    mask: Optional[np.ndarray] = None  # HxW bool at the original resolution


class TrackedMask(NamedTuple):
    mask: np.ndarray  # HxW bool at the original resolution (logits > 0, as sam2's examples threshold)
    score: float  # sigmoid of sam2's object score logit: how sure it is the object is there


class VideoTracker:
    """One video's tracking state on a built video predictor.

    ``dtype`` as ``sam.dtype`` (auto: bfloat16 autocast on CUDA, float32 on CPU).
    ``memory_window`` overrides the pruning window (None: exactly what sam2 can still read;
    ultralytics uses ``num_maskmem``, which changes results). ``offload_state_to_cpu`` keeps
    memory features in host memory (slower, less GPU memory)."""

    def __init__(self, predictor, frames: FrameSource, dtype: str = "auto", offload_state_to_cpu: bool = False,
                 memory_window: Optional[int] = None):
        import sam2.sam2_video_predictor as svp

        self.predictor, self.frames = predictor, frames
        self.dtype = resolve_dtype(dtype, predictor.device)
        stride = predictor.memory_temporal_stride_for_eval
        self.window = memory_window or max(predictor.num_maskmem * stride, predictor.max_obj_ptrs_in_encoder)
        self._protect: Optional[tuple[int, int]] = None  # frames kept for the reverse pass to come
        with _INIT_LOCK, self._autocast():
            saved = svp.load_video_frames
            svp.load_video_frames = lambda **kwargs: (frames, frames.height, frames.width)
            try:
                self.state = predictor.init_state(video_path="<FrameSource>", offload_state_to_cpu=offload_state_to_cpu)
            finally:
                svp.load_video_frames = saved

    def _autocast(self):
        return autocast(self.dtype, self.predictor.device)

    @property
    def obj_ids(self) -> list:
        return list(self.state["obj_ids"])

    def add(self, prompt: ObjectPrompt) -> dict[int, TrackedMask]:
        """Add (or re-prompt) an object on its frame, also after tracking started; returns every
        object's mask on that frame as sam2 consolidates it."""
        with self._autocast():
            if prompt.mask is not None:
                frame, ids, logits = self.predictor.add_new_mask(self.state, prompt.frame, prompt.obj_id, np.asarray(prompt.mask, bool))
            else:
                labels = None if prompt.points is None else (prompt.point_labels if prompt.point_labels is not None else [1] * len(prompt.points))
                frame, ids, logits = self.predictor.add_new_points_or_box(
                    self.state, prompt.frame, prompt.obj_id, points=prompt.points, labels=labels, box=prompt.box)
        return self._masks(frame, ids, logits, temp=True)

    def remove(self, obj_id) -> None:
        with self._autocast():
            self.predictor.remove_object(self.state, obj_id, need_output=False)

    def propagate(self, start: Optional[int] = None, count: Optional[int] = None, reverse: bool = False,
                  yield_start: bool = True) -> Iterator[tuple[int, dict[int, TrackedMask]]]:
        """sam2's ``propagate_in_video`` (from ``start``, default the first prompted frame, over
        ``count`` frames after it), pruning the state after each frame."""
        frames = self.predictor.propagate_in_video(self.state, start_frame_idx=start, max_frame_num_to_track=count, reverse=reverse)
        try:
            while True:
                with self._autocast():
                    item = next(frames, None)
                if item is None:
                    return
                frame, ids, logits = item
                masks = self._masks(frame, ids, logits)
                self._prune(frame)
                if yield_start or frame != start:
                    yield frame, masks
        finally:
            frames.close()

    def track(self, prompts: Sequence[ObjectPrompt], reverse: bool = False) -> Iterator[tuple[int, dict[int, TrackedMask]]]:
        """Prompted mode: add every prompt, propagate forward from the first prompted frame to the
        end, then (``reverse``) backward from it to frame 0. Each frame is yielded once (the first
        prompted frame by the forward pass): frames p..n-1, then p-1..0."""
        if not prompts:
            raise ValueError("prompted tracking needs at least one prompt")
        for prompt in prompts:
            self.add(prompt)
        first = min(p.frame for p in prompts)
        self._protect = (first, first + self.window) if reverse and first > 0 else None
        yield from self.propagate()
        self._protect = None
        if reverse and first > 0:
            yield from self.propagate(start=first, reverse=True, yield_start=False)

    def _masks(self, frame: int, ids, logits, temp: bool = False) -> dict[int, TrackedMask]:
        import torch

        binary = (logits[:, 0] > 0.0).cpu().numpy()
        scores = {}
        for idx, obj_id in enumerate(ids):
            out = None
            if temp:
                temp_out = self.state["temp_output_dict_per_obj"][idx]
                out = temp_out["cond_frame_outputs"].get(frame) or temp_out["non_cond_frame_outputs"].get(frame)
            if out is None:
                done = self.state["output_dict_per_obj"][idx]
                out = done["cond_frame_outputs"].get(frame) or done["non_cond_frame_outputs"].get(frame)
            scores[obj_id] = float(torch.sigmoid(out["object_score_logits"].float()).item()) if out is not None else 0.0
        return {obj_id: TrackedMask(binary[idx], scores[obj_id]) for idx, obj_id in enumerate(ids)}

    def _prune(self, frame: int) -> None:
        """Drop non-conditioning outputs (and tracked-frame notes) more than ``window`` frames
        from ``frame``, except those a planned reverse pass will read."""
        low, high = frame - self.window, frame + self.window
        keep = self._protect

        def stale(t: int) -> bool:
            return not (low <= t <= high or (keep is not None and keep[0] <= t <= keep[1]))

        for idx, out in self.state["output_dict_per_obj"].items():
            non_cond = out["non_cond_frame_outputs"]
            for t in [t for t in non_cond if stale(t)]:
                del non_cond[t]
            tracked = self.state["frames_tracked_per_obj"][idx]
            for t in [t for t in tracked if stale(t) and t not in out["cond_frame_outputs"]]:
                del tracked[t]

    def memory_frames(self) -> int:
        """Non-conditioning outputs held over all objects (what pruning bounds)."""
        return sum(len(out["non_cond_frame_outputs"]) for out in self.state["output_dict_per_obj"].values())

    def close(self) -> None:
        self.frames.close()
        self.state.clear()
