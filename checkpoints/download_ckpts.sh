#!/usr/bin/env bash
# Fetch the official SAM 2.1 checkpoints and YOLOv8 detect weights into this folder.
#   bash checkpoints/download_ckpts.sh                 # SAM 2.1 tiny + yolov8n (what the defaults use)
#   bash checkpoints/download_ckpts.sh all             # all four SAM 2.1 sizes + yolov8n..x
#   bash checkpoints/download_ckpts.sh sam2.1_hiera_large.pt yolov8x.pt
#   bash checkpoints/download_ckpts.sh open-vocab      # yoloe-11s-seg.pt + its text encoder mobileclip_blt.ts
#   bash checkpoints/download_ckpts.sh yoloe-11l-seg.pt yolov8l-worldv2.pt ViT-B-32.pt   # any of them by name
# Open-vocabulary files (yoloe-*-seg.pt, yolov8*-worldv2.pt, mobileclip*.ts) come from the v8.4.0
# assets release, where ultralytics 8.4 fetches them; ViT-B-32.pt (YOLO-World's CLIP) from OpenAI.
# Same URLs as `autolabel run` uses when it fetches missing default weights by itself.
set -euo pipefail
cd "$(dirname "$0")"
SAM_URL=https://dl.fbaipublicfiles.com/segment_anything_2/092824
YOLO_URL=https://github.com/ultralytics/assets/releases/download/v8.3.0
OPEN_VOCAB_URL=https://github.com/ultralytics/assets/releases/download/v8.4.0
CLIP_URL=https://openaipublic.azureedge.net/clip/models/40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af
SAM_ALL=(sam2.1_hiera_tiny.pt sam2.1_hiera_small.pt sam2.1_hiera_base_plus.pt sam2.1_hiera_large.pt)
YOLO_ALL=(yolov8n.pt yolov8s.pt yolov8m.pt yolov8l.pt yolov8x.pt)

if [ $# -eq 0 ]; then
    files=(sam2.1_hiera_tiny.pt yolov8n.pt)
elif [ "$1" = all ]; then
    files=("${SAM_ALL[@]}" "${YOLO_ALL[@]}")
elif [ "$1" = open-vocab ]; then
    files=(yoloe-11s-seg.pt mobileclip_blt.ts)
else
    files=("$@")
fi

fetch() {  # url name: download to a temporary name, then move into place
    if [ -s "$2" ]; then echo "have $2"; return; fi
    echo "fetching $2"
    if command -v curl >/dev/null; then curl -fL --progress-bar -o "$2.part" "$1"; else wget -O "$2.part" "$1"; fi
    mv "$2.part" "$2"
}

for f in "${files[@]}"; do
    case "$f" in
        sam2.1_*) fetch "$SAM_URL/$f" "$f" ;;
        yoloe-*-seg.pt | yolov8*-worldv2.pt | mobileclip*.ts) fetch "$OPEN_VOCAB_URL/$f" "$f" ;;
        ViT-B-32.pt) fetch "$CLIP_URL/$f" "$f" ;;
        yolo*) fetch "$YOLO_URL/$f" "$f" ;;
        *) echo "unknown checkpoint '$f' (expected sam2.1_hiera_{tiny,small,base_plus,large}.pt, yolov8{n,s,m,l,x}.pt, yoloe-11{s,m,l}-seg.pt, yolov8{s,m,l,x}-worldv2.pt, mobileclip_blt.ts ...)" >&2; exit 2 ;;
    esac
done
