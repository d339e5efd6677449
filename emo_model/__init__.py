"""EMO (arXiv 2402.17485) network, weights loading and sampling pipeline, diffusers style."""
from .conditioning import (
    AudioProjection,
    FaceLocator,
    SpeedProjection,
    constant_speed_buckets,
    speed_bucket_encoding,
    window_frames,
)
from .model import EMOModel, EMOModelOutput, ReferenceFeatures

__all__ = [
    "AudioProjection",
    "EMOModel",
    "EMOModelOutput",
    "EMOPipeline",
    "FaceLocator",
    "ReferenceFeatures",
    "SpeedProjection",
    "constant_speed_buckets",
    "speed_bucket_encoding",
    "window_frames",
]


def __getattr__(name):  # the pipeline pulls in transformers; import it lazily
    if name == "EMOPipeline":
        from .pipeline import EMOPipeline

        return EMOPipeline
    raise AttributeError(name)
