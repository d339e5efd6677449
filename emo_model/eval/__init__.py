"""The EMO paper's evaluation (FID, FVD, SyncNet LSE-C/D, F-SIM, E-FID) on the held-out split.

    from emo_model.eval import GenerateConfig, ScoreConfig, generate_corpus, score_corpus, format_table

    generate_corpus(GenerateConfig(model="emo-model", shards=["corpus/test-*.tar"], out="gen"))
    result = score_corpus("gen", ["corpus/test-*.tar"], ScoreConfig(weights_dir="eval-weights"))
    print(format_table(result))

``emo-eval`` (:mod:`emo_model.eval.cli`) wraps these. Every network loads from a local file;
a metric without its weights is reported as skipped with the reason.
"""
from .config import METRICS, GenerateConfig, ScoreConfig
from .frechet import GaussianStats, frechet_distance, frechet_distance_between
from .weights import WeightsInfo, WeightsMissing

__all__ = [
    "METRICS", "GaussianStats", "GenerateConfig", "ScoreConfig", "WeightsInfo", "WeightsMissing",
    "format_table", "frechet_distance", "frechet_distance_between", "generate_corpus", "score_corpus",
]


def __getattr__(name):  # generation / scoring pull in torch, diffusers, dlib: import them on use
    if name == "generate_corpus":
        from .generate import generate_corpus

        return generate_corpus
    if name in ("score_corpus", "format_table"):
        from . import score

        return getattr(score, name)
    raise AttributeError(name)
