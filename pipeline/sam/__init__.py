"""SAM 2.1: batched image segmentation, mask encoding and (``video.py``) video tracking."""
