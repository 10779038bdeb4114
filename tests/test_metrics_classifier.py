"""The dataset classifier (features for fast evaluation on small data) and the Classification Accuracy Score."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.metrics import (
    ClassifierExtractor,
    accuracy,
    available_extractors,
    build_extractor,
    classification_accuracy_score,
    compute_reference_stats,
    frechet_distance,
    inception_score,
    load_classifier,
    load_or_train_classifier,
    save_classifier,
    train_classifier,
)
from pipeline.metrics.frechet import feature_stats


@pytest.fixture(scope="module")
def digits():
    """scikit-learn's 1,797 8x8 digits as (N, 1, 8, 8) in [-1, 1], split 1,400 / 397."""
    datasets = pytest.importorskip("sklearn.datasets")
    d = datasets.load_digits()
    images = torch.tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    labels = torch.tensor(d.target, dtype=torch.long)
    return images[:1400], labels[:1400], images[1400:], labels[1400:]


@pytest.fixture(scope="module")
def real_classifier(digits):
    x, y, _, _ = digits
    return train_classifier(x, y, 10, epochs=5, seed=0)


def test_classifier_trained_on_real_digits_generalises(digits, real_classifier):
    _, _, x_test, y_test = digits
    assert accuracy(real_classifier, x_test, y_test) > 0.88


def test_classifier_round_trips_through_a_weights_only_file_and_the_registry(digits, real_classifier, tmp_path):
    _, _, x_test, _ = digits
    path = save_classifier(real_classifier, tmp_path / "clf" / "digits.pt", accuracy=0.9)
    payload = torch.load(path, weights_only=True)
    assert payload["kind"] == "small-cnn" and payload["extra"] == {"accuracy": 0.9}
    loaded = load_classifier(path)
    torch.testing.assert_close(loaded(x_test[:16]), real_classifier(x_test[:16]))

    assert "classifier" in available_extractors() and "inception" in available_extractors()
    ex = build_extractor("classifier", path=path)
    assert ex.name == ClassifierExtractor(real_classifier).name and ex.name.startswith("classifier-")
    feats, logits = ex.features_and_logits(x_test[:16])
    assert feats.shape == (16, 128) and logits.shape == (16, 10)
    torch.testing.assert_close(ex.logits(x_test[:16]), logits)


def test_classifier_features_separate_real_digits_from_noise_and_its_score_counts_classes(digits, real_classifier):
    x, _, x_test, _ = digits
    ex = ClassifierExtractor(real_classifier)
    ref = compute_reference_stats([x[:700], x[700:]], ex)
    mu_t, s_t = feature_stats(ex.features(x_test).numpy())
    noise = torch.rand(397, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mu_n, s_n = feature_stats(ex.features(noise).numpy())
    fid_real = frechet_distance(mu_t, s_t, ref.mu, ref.sigma)
    fid_noise = frechet_distance(mu_n, s_n, ref.mu, ref.sigma)
    assert fid_noise > 10 * fid_real
    score, _ = inception_score(ex.logits(x_test).numpy())
    assert score > 6.0  # ten balanced classes, confidently recognised: close to 10


class DigitsOracle(nn.Module):
    """A 'generator' that returns a real training digit of the requested class (picked by z)."""

    def __init__(self, images, labels):
        super().__init__()
        self.by_class = [images[labels == c] for c in range(10)]

    def forward(self, z, y):
        pick = (z[:, 0].abs() * 1e4).long()
        return torch.stack([self.by_class[c][i % len(self.by_class[c])] for c, i in zip(y.tolist(), pick.tolist())])


class NoiseGenerator(nn.Module):
    def forward(self, z, y):
        return torch.tanh(z[:, :64].reshape(-1, 1, 8, 8))


def test_cas_of_class_faithful_samples_is_close_to_the_real_classifier(digits, real_classifier):
    x, y, x_test, y_test = digits
    kwargs = dict(num_classes=10, test_images=x_test, test_labels=y_test, num_samples=1000, batch_size=250,
                  train_kwargs={"epochs": 5})
    good = classification_accuracy_score(DigitsOracle(x, y), dim_z=8, real_classifier=real_classifier, **kwargs)
    assert set(good) == {"cas", "real_accuracy"}
    assert good["cas"] > good["real_accuracy"] - 0.1
    bad = classification_accuracy_score(NoiseGenerator(), dim_z=64, **kwargs)
    assert set(bad) == {"cas"} and bad["cas"] < 0.3  # chance is 0.1


def test_load_or_train_trains_once_then_reuses_the_file(digits, tmp_path):
    x, y, x_test, y_test = digits
    calls = []

    def data():
        calls.append(1)
        return x[:300], y[:300]

    first = load_or_train_classifier(tmp_path / "clf.pt", data, 10, epochs=1)
    second = load_or_train_classifier(tmp_path / "clf.pt", data, 10, epochs=1)
    assert len(calls) == 1
    torch.testing.assert_close(first(x_test[:8]), second(x_test[:8]))


def test_classifier_rejects_bad_inputs():
    with pytest.raises(ValueError, match="labels must lie"):
        train_classifier(torch.zeros(4, 1, 8, 8), torch.tensor([0, 1, 2, 5]), 3)
    with pytest.raises(ValueError, match="expected images"):
        train_classifier(torch.zeros(4, 8, 8), torch.zeros(4), 3)
    assert np.isfinite(accuracy(train_classifier(torch.zeros(4, 3, 8, 8), torch.tensor([0, 1, 0, 1]), 2, epochs=1),
                                torch.zeros(2, 3, 8, 8), torch.tensor([0, 1])))
