"""SAM 2.1: the batched encoder/decoder, prompts, masks (COCO RLE) and their quality metrics."""
