"""autolabel: YOLOv8 boxes -> SAM 2.1 masks -> Parquet, over any fsspec image source, on Ray."""
__version__ = "0.1.0"


def __getattr__(name: str):
    """``from pipeline import Predictor`` without importing torch for every ``import pipeline``."""
    if name == "Predictor":
        from pipeline.predict import Predictor

        return Predictor
    raise AttributeError(name)
