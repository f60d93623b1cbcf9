"""autolabel: YOLOv8 boxes -> SAM 2.1 masks -> Parquet, over any fsspec image source, on Ray."""
__version__ = "0.1.0"
