"""Model weights: fetching, sha256, checkpoint resolution, and building SAM 2.1 / YOLO."""
