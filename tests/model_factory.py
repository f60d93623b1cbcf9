"""Random-weight SAM 2.1 and YOLOv8 checkpoints, saved in the official file formats.

No weights can be downloaded here, so tests build the real architectures from their configs,
give them random weights and save them exactly as the official checkpoints are saved; the
pipeline then loads them through the same code path it uses for real weights.
"""
from __future__ import annotations

from pathlib import Path

import torch


def make_sam_checkpoint(path: Path, size: str = "tiny", seed: int = 0) -> Path:
    """``{"model": state_dict}``, the layout of the official sam2.1_hiera_*.pt files."""
    from sam2.build_sam import build_sam2

    from pipeline.models.weights import SAM_MODELS

    torch.manual_seed(seed)
    model = build_sam2(SAM_MODELS[size][0], None, device="cpu", mode="eval")
    torch.save({"model": model.state_dict()}, path)
    return path


def make_yolo_checkpoint(path: Path, seed: int = 0) -> Path:
    """A YOLOv8n with COCO class names and BatchNorm calibrated on noise, saved by ``YOLO.save``.

    A fresh yolov8n.yaml model has vanishing activations (every box ties at one score); running
    BatchNorm statistics over random input gives distinct, repeatable boxes.
    """
    from ultralytics import YOLO
    from ultralytics.cfg import get_cfg  # noqa: F401  (imports ultralytics' settings once)
    from ultralytics.utils import ROOT, YAML

    torch.manual_seed(seed)
    yolo = YOLO("yolov8n.yaml")
    net = yolo.model
    net.names = dict(enumerate(YAML.load(ROOT / "cfg/datasets/coco.yaml")["names"].values()))
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None
            module.reset_running_stats()
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.rand(2, 3, 256, 256))
    net.eval()
    # Calibrated activations are large enough that every class score saturates at 1.0; shrink
    # the class logits so scores spread out (about 0.05-0.2) and confidence thresholds matter.
    with torch.no_grad():
        for branch in net.model[-1].cv3:
            branch[-1].weight.mul_(1e-3)
            branch[-1].bias.fill_(-3.0)
    yolo.save(str(path))
    return path


def make_open_vocab_checkpoint(path: Path, photos: list, yaml: str = "yoloe-11s-seg.yaml", seed: int = 0) -> Path:
    """A YOLOE (or YOLO-World, from ``yolov8s-worldv2.yaml``) with random weights, BatchNorm
    calibrated on real photos, saved by ``Model.save``. Save it under an official-looking name
    (``yoloe-11s-seg.pt``): ultralytics binds prompt embeddings to the file's stem.

    Calibrated on noise, every class score of a random YOLOE saturates at 1.0; on photos the
    scores spread, and lowering the contrastive heads' scale and bias puts most of them between
    about 0.05 and 0.5, so confidence thresholds matter and boxes are distinct.
    """
    import torch.nn.functional as F
    from ultralytics import YOLO

    torch.manual_seed(seed)
    model = YOLO(yaml)  # routes to YOLOE / YOLOWorld by the yaml's name
    net = model.model
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None
            module.reset_running_stats()
    batch = torch.stack([F.interpolate(torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float() / 255, size=(256, 256),
                                       mode="bilinear")[0] for rgb in photos])
    net.train()
    with torch.no_grad():
        net(batch)
    net.eval()
    with torch.no_grad():
        head = net.model[-1]
        for contrast in list(head.cv4) + list(getattr(head, "one2one_cv4", None) or []):
            if hasattr(contrast, "logit_scale"):
                contrast.logit_scale.fill_(-1.0)
                contrast.bias.fill_(-3.0)
    model.save(str(path))
    return path
