"""Evaluation: FID, Inception Score, improved precision/recall, CAS, reference statistics, truncation sweeps.

For the trainer:

    from pipeline import metrics
    extractor = metrics.build_extractor("inception", weights=cfg.eval.inception_weights, device=device)
    ref = metrics.reference_stats(real_batches, extractor,
                                  metrics.reference_stats_path(data_dir, extractor, resolution, count))
    result = metrics.evaluate_generator(G_ema, num_classes=..., dim_z=..., num_samples=cfg.eval.num_samples,
                                        batch_size=..., extractor=extractor, ref_stats=ref,
                                        truncation=cfg.eval.truncation, device=device, seed=0)
    # -> {'fid', 'is_mean', 'is_std' (if the extractor has logits), 'precision_inception', 'recall_inception'}

Each metric is one module (frechet, inception_score, precision_recall, cas); extractors.py holds the
feature-extractor registry (inception.py, classifier.py, vgg16.py); reference.py the cached real statistics;
evaluate.py the generator loop; collective.py how ranks of a data-parallel group share that work (pass
group=Collective(rank, world_size, device) on every rank); plots.py and model_registry.py the MLflow side.
"""

from pipeline.metrics.cas import classification_accuracy_score
from pipeline.metrics.classifier import (
    ClassifierExtractor,
    SmallClassifier,
    accuracy,
    load_classifier,
    load_or_train_classifier,
    save_classifier,
    train_classifier,
)
from pipeline.metrics.collective import LOCAL, Collective, RankFailed
from pipeline.metrics.evaluate import evaluate_generator, generate, truncated_normal, truncation_sweep
from pipeline.metrics.extractors import (
    FeatureExtractor,
    available_extractors,
    build_extractor,
    register_extractor,
)
from pipeline.metrics.frechet import FeatureStats, feature_stats, frechet_distance
from pipeline.metrics.inception import (
    InceptionExtractor,
    InceptionWeightsNotFound,
    bundled_torchscript_path,
    locate_inception_weights,
)
from pipeline.metrics.inception_score import InceptionScoreStats, inception_score
from pipeline.metrics.model_registry import register_best
from pipeline.metrics.plots import plot_truncation_sweep
from pipeline.metrics.precision_recall import precision_recall
from pipeline.metrics.reference import (
    ReferenceStats,
    compute_reference_stats,
    reference_stats,
    reference_stats_path,
)
from pipeline.metrics.vgg16 import VGG16Extractor, VGG16WeightsNotFound, vgg16_weights_path

__all__ = [
    "evaluate_generator",
    "truncation_sweep",
    "plot_truncation_sweep",
    "generate",
    "truncated_normal",
    "reference_stats",
    "reference_stats_path",
    "compute_reference_stats",
    "ReferenceStats",
    "frechet_distance",
    "feature_stats",
    "FeatureStats",
    "inception_score",
    "InceptionScoreStats",
    "Collective",
    "LOCAL",
    "RankFailed",
    "VGG16Extractor",
    "VGG16WeightsNotFound",
    "vgg16_weights_path",
    "precision_recall",
    "classification_accuracy_score",
    "FeatureExtractor",
    "register_extractor",
    "build_extractor",
    "available_extractors",
    "InceptionExtractor",
    "InceptionWeightsNotFound",
    "locate_inception_weights",
    "bundled_torchscript_path",
    "ClassifierExtractor",
    "SmallClassifier",
    "train_classifier",
    "save_classifier",
    "load_classifier",
    "load_or_train_classifier",
    "accuracy",
    "register_best",
]
