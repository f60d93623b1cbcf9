#!/usr/bin/env bash
# Fetch the official SAM 2.1 checkpoints and YOLOv8 detect weights into this folder.
#   bash checkpoints/download_ckpts.sh                 # SAM 2.1 tiny + yolov8n (what the defaults use)
#   bash checkpoints/download_ckpts.sh all             # all four SAM 2.1 sizes + yolov8n..x
#   bash checkpoints/download_ckpts.sh sam2.1_hiera_large.pt yolov8x.pt
# Same URLs as `autolabel run` uses when it fetches missing default weights by itself.
set -euo pipefail
cd "$(dirname "$0")"
SAM_URL=https://dl.fbaipublicfiles.com/segment_anything_2/092824
YOLO_URL=https://github.com/ultralytics/assets/releases/download/v8.3.0
SAM_ALL=(sam2.1_hiera_tiny.pt sam2.1_hiera_small.pt sam2.1_hiera_base_plus.pt sam2.1_hiera_large.pt)
YOLO_ALL=(yolov8n.pt yolov8s.pt yolov8m.pt yolov8l.pt yolov8x.pt)

if [ $# -eq 0 ]; then
    files=(sam2.1_hiera_tiny.pt yolov8n.pt)
elif [ "$1" = all ]; then
    files=("${SAM_ALL[@]}" "${YOLO_ALL[@]}")
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
        yolo*) fetch "$YOLO_URL/$f" "$f" ;;
        *) echo "unknown checkpoint '$f' (expected sam2.1_hiera_{tiny,small,base_plus,large}.pt or yolov8{n,s,m,l,x}.pt)" >&2; exit 2 ;;
    esac
done
