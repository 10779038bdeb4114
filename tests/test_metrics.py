"""FID, Inception Score, precision/recall and the evaluation loop, against independent reference formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from scipy.spatial.distance import cdist
from torch import nn

from pipeline.metrics import (
    FeatureExtractor,
    FeatureStats,
    ReferenceStats,
    compute_reference_stats,
    evaluate_generator,
    feature_stats,
    frechet_distance,
    inception_score,
    plot_truncation_sweep,
    precision_recall,
    reference_stats,
    reference_stats_path,
    truncated_normal,
    truncation_sweep,
)


# -- independent references ---------------------------------------------------------------------------------
def fid_pytorch_fid_style(mu1, s1, mu2, s2, eps=1e-6):
    """The formula pytorch-fid / TTUR use: scipy's general matrix square root of the product."""
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(s1.dot(s2))
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((s1 + offset).dot(s2 + offset))
    if np.iscomplexobj(covmean):
        assert np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3)
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def fid_torch_fidelity_style(mu1, s1, mu2, s2):
    """torch-fidelity's formula: square roots of the eigenvalues of the (non-symmetric) product."""
    diff = mu1 - mu2
    tr_covmean = np.sum(np.sqrt(np.linalg.eigvals(s1.dot(s2))).real)
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def is_reference(logits, splits=10, seed=2020):
    """Inception Score written out with torch ops in the torch-fidelity convention (shuffle, N*i//splits)."""
    x = torch.as_tensor(logits, dtype=torch.float64)
    x = x[np.random.RandomState(seed).permutation(x.shape[0])]
    p = torch.softmax(x, dim=1)
    scores = []
    n = x.shape[0]
    for i in range(splits):
        chunk = p[i * n // splits:(i + 1) * n // splits]
        marginal = chunk.mean(dim=0)
        kl = sum(float((row * (row.log() - marginal.log())).sum()) for row in chunk) / chunk.shape[0]
        scores.append(math.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


def pr_reference(real, fake, k=3):
    """Brute-force improved precision/recall with scipy distances and explicit sorting."""
    def radii(x):
        d = cdist(x, x)
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself

    r_real, r_fake = radii(real), radii(fake)
    d = cdist(fake, real)
    precision = np.mean([(d[i] <= r_real).any() for i in range(len(fake))])
    recall = np.mean([(d[:, j] <= r_fake).any() for j in range(len(real))])
    return precision, recall


def random_gaussian_features(rng, n, d, scale=1.0, shift=0.0):
    a = rng.normal(size=(d, d)) / math.sqrt(d)
    return (rng.normal(size=(n, d)) @ a) * scale + shift


# -- FID ----------------------------------------------------------------------------------------------------
def test_feature_stats_match_numpy_mean_and_cov_when_streamed_in_chunks():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1000, 32)) * 3 + 100.0  # large common offset: the cancellation case
    acc = FeatureStats()
    for chunk in np.array_split(x, 7):
        acc.update(chunk)
    assert acc.count == 1000
    np.testing.assert_allclose(acc.mean, x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(acc.cov, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-9)


def test_fid_matches_pytorch_fid_and_torch_fidelity_formulas_on_the_same_features():
    rng = np.random.default_rng(1)
    real = random_gaussian_features(rng, 3000, 64)
    fake = random_gaussian_features(rng, 3000, 64, scale=1.3, shift=0.2)
    mu1, s1 = feature_stats(real)
    mu2, s2 = feature_stats(fake)
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(fid_pytorch_fid_style(mu1, s1, mu2, s2), rel=1e-6)
    assert ours == pytest.approx(fid_torch_fidelity_style(mu1, s1, mu2, s2), rel=1e-6)
    # the statistics themselves are numpy's (as both references compute them)
    np.testing.assert_allclose(s1, np.cov(real, rowvar=False), rtol=1e-9, atol=1e-12)


def test_fid_of_a_set_against_itself_is_zero():
    rng = np.random.default_rng(2)
    mu, sigma = feature_stats(random_gaussian_features(rng, 500, 128))
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8 * np.trace(sigma)


def test_fid_between_two_gaussians_has_the_closed_form():
    rng = np.random.default_rng(3)
    d = 16
    # commuting (diagonal) covariances: Tr((S1 S2)^1/2) = sum sqrt(a_i b_i)
    a, b = rng.uniform(0.5, 2.0, d), rng.uniform(0.5, 2.0, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    # isotropic case: ||mu1 - mu2||^2 + d (s1 - s2)^2
    assert frechet_distance(mu1, 4.0 * np.eye(d), mu2, 1.0 * np.eye(d)) == pytest.approx(
        np.sum((mu1 - mu2) ** 2) + d * (2.0 - 1.0) ** 2, rel=1e-10
    )
    # a rotated (non-commuting) pair against scipy: 1-D sanity, FID of N(0,1) vs N(3,4) = 9 + (1 - 2)^2
    assert frechet_distance(np.zeros(1), np.eye(1), np.full(1, 3.0), 4 * np.eye(1)) == pytest.approx(10.0)


def test_fid_handles_rank_deficient_covariances_from_few_samples():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(20, 64)), rng.normal(size=(20, 64)) + 0.5  # rank 19 < 64
    mu1, s1 = feature_stats(x)
    mu2, s2 = feature_stats(y)
    fid = frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(fid) and fid > 0
    assert fid == pytest.approx(fid_pytorch_fid_style(mu1, s1, mu2, s2), rel=1e-3)


def test_fid_rejects_mismatched_or_non_finite_statistics():
    with pytest.raises(ValueError, match="mismatched"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.full(2, np.nan), np.eye(2), np.zeros(2), np.eye(2))


# -- Inception Score ----------------------------------------------------------------------------------------
def test_inception_score_of_uniform_predictions_is_one():
    mean, std = inception_score(np.zeros((100, 1008)))
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_of_confident_predictions_spread_evenly_is_the_class_count():
    k = 10
    logits = np.full((1000, k), -1e4)
    logits[np.arange(1000), np.arange(1000) % k] = 0.0  # one-hot, each class 100 times
    mean, _ = inception_score(logits, splits=1)
    assert mean == pytest.approx(k, rel=1e-9)
    mean10, _ = inception_score(logits, splits=10)  # random splits: close to k, never above
    assert 9.0 < mean10 <= k + 1e-9


def test_inception_score_matches_reference_on_random_logits():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(500, 50)) * 3
    ours = inception_score(logits, splits=10)
    ref = is_reference(logits, splits=10)
    assert ours[0] == pytest.approx(ref[0], rel=1e-10) and ours[1] == pytest.approx(ref[1], rel=1e-8)


def test_inception_score_uses_fewer_splits_than_samples():
    mean, std = inception_score(np.eye(4) * 50, splits=10)
    assert mean == pytest.approx(1.0, abs=1e-6)  # one sample per split: p(y) = p(y|x)
    assert std == pytest.approx(0.0, abs=1e-6)


# -- precision / recall -------------------------------------------------------------------------------------
def test_precision_recall_of_identical_sets_is_one():
    x = np.random.default_rng(6).normal(size=(200, 16))
    assert precision_recall(x, x.copy()) == (1.0, 1.0)


def test_precision_recall_of_disjoint_far_sets_is_zero():
    rng = np.random.default_rng(7)
    real, fake = rng.normal(size=(200, 16)), rng.normal(size=(200, 16)) + 100.0
    assert precision_recall(real, fake) == (0.0, 0.0)


def test_precision_recall_separate_fidelity_from_coverage():
    rng = np.random.default_rng(8)
    real = rng.normal(size=(400, 8))
    narrow = rng.normal(size=(400, 8)) * 0.3  # inside the real manifold, covering little of it
    precision, recall = precision_recall(real, narrow)
    assert precision > 0.95 and recall < 0.5


def test_precision_recall_match_brute_force_reference():
    rng = np.random.default_rng(9)
    real, fake = rng.normal(size=(300, 12)), rng.normal(size=(250, 12)) * 1.2 + 0.3
    ours = precision_recall(real, fake, k=3, chunk=64)
    ref = pr_reference(real, fake, k=3)
    assert ours == pytest.approx(ref, abs=1e-12)


# -- reference statistics -----------------------------------------------------------------------------------
class PooledPixels(FeatureExtractor):
    """A cheap deterministic extractor for tests: 4x4 average-pooled pixels, and fixed random logits."""

    name = "pooled-pixels"
    has_logits = True

    def __init__(self, channels: int = 3, num_logits: int = 10):
        self.feature_dim = channels * 16
        self.proj = torch.randn(self.feature_dim, num_logits, generator=torch.Generator().manual_seed(0)) * 4

    def features_and_logits(self, images):
        f = torch.nn.functional.adaptive_avg_pool2d(images.float().cpu(), 4).flatten(1)
        return f, f @ self.proj


def image_batches(n, batch, seed=0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    for start in range(0, n, batch):
        m = min(batch, n - start)
        images = (torch.rand(m, 3, 8, 8, generator=g) * 2 - 1) * 0.5 + shift
        yield images.clamp(-1, 1), torch.zeros(m, dtype=torch.long)


def test_reference_stats_are_cached_by_name_written_atomically_and_reused(tmp_path):
    ex = PooledPixels()
    path = reference_stats_path(tmp_path / "data", ex, 8, 300)
    assert path.endswith("/data/fid_stats_pooled-pixels_8_300.npz")
    ref = reference_stats(image_batches(300, 64), ex, path, keep_features=100)
    assert ref.count == 300 and ref.resolution == 8 and ref.features.shape == (100, 48)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["fid_stats_pooled-pixels_8_300.npz"]

    def must_not_iterate():
        raise AssertionError("the cache should have been used")
        yield  # pragma: no cover

    again = reference_stats(must_not_iterate(), ex, path)
    np.testing.assert_array_equal(again.mu, ref.mu)
    np.testing.assert_array_equal(again.sigma, ref.sigma)
    np.testing.assert_array_equal(again.features, ref.features)

    other = PooledPixels()
    other.name = "another-extractor"
    with pytest.raises(ValueError, match="another-extractor"):
        reference_stats(must_not_iterate(), other, path)


def test_reference_stats_equal_the_statistics_of_all_features_and_keep_a_uniform_subset():
    ex = PooledPixels()
    ref = compute_reference_stats(image_batches(500, 37), ex, keep_features=50, max_images=450)
    feats = torch.cat([ex.features(b[0]) for b in image_batches(500, 37)])[:450].numpy().astype(np.float64)
    assert ref.count == 450
    np.testing.assert_allclose(ref.mu, feats.mean(0), rtol=1e-6)
    np.testing.assert_allclose(ref.sigma, np.cov(feats, rowvar=False), rtol=1e-5, atol=1e-9)
    # every kept row is one of the real rows
    kept = ref.features.astype(np.float64)
    assert all(np.abs(feats - row).sum(1).min() < 1e-5 for row in kept)


# -- the evaluation loop ------------------------------------------------------------------------------------
class ToyGenerator(nn.Module):
    """G(z, y) -> (N, 3, 8, 8) in [-1, 1]; class y shifts the brightness."""

    def __init__(self, dim_z=16, num_classes=4, scale=0.5):
        super().__init__()
        self.dim_z, self.num_classes = dim_z, num_classes
        g = torch.Generator().manual_seed(1)
        self.proj = nn.Parameter(torch.randn(dim_z, 3 * 64, generator=g) / math.sqrt(dim_z) * scale)
        self.embed = nn.Embedding(num_classes, 3 * 64)
        nn.init.normal_(self.embed.weight, std=0.2)
        self.seen_training = []

    def forward(self, z, y):
        self.seen_training.append(self.training)
        return torch.tanh(z @ self.proj + self.embed(y)).view(-1, 3, 8, 8)


def generator_reference(G, n, seed, ex, tmp_path):
    from pipeline.metrics import generate

    batches = (imgs for imgs, _ in generate(G, num_classes=G.num_classes, dim_z=G.dim_z, num_samples=n,
                                             batch_size=100, seed=seed))
    return reference_stats(batches, ex, tmp_path / f"ref_{seed}.npz")


def test_generate_runs_g_on_a_cpu_in_chunks_with_global_bounds_and_the_same_images():
    from pipeline.metrics import generate
    from pipeline.metrics.evaluate import CPU_SAMPLE_CHUNK as C

    class Recording(ToyGenerator):
        def forward(self, z, y):
            self.sizes.append(len(z))
            return super().forward(z, y)

    G = Recording()
    G.sizes = []
    whole = [(x, y) for x, y in generate(G, num_classes=4, dim_z=16, num_samples=5 * C + 7, batch_size=3 * C)]
    assert [len(x) for x, _ in whole] == [3 * C, 2 * C + 7]  # the caller's batches are kept ...
    assert G.sizes == [C, C, C, C, C, 7]  # ... G sees no more than a chunk at a time
    G.sizes = []
    part = torch.cat([x for x, _ in generate(G, num_classes=4, dim_z=16, num_samples=5 * C + 7, batch_size=3 * C,
                                             start=C // 2, stop=4 * C + 3)])
    # chunk bounds at multiples of the chunk wherever a share starts, and at its batches' ends (C // 2 + 3 * C)
    assert G.sizes == [C - C // 2, C, C, C // 2, C // 2, 3]
    images = torch.cat([x for x, _ in whole])
    assert torch.equal(part, images[C // 2:4 * C + 3])
    one_batch = next(iter(generate(G, num_classes=4, dim_z=16, num_samples=5 * C + 7, batch_size=5 * C + 7)))[0]
    assert torch.equal(one_batch, images)


def test_evaluate_generator_reports_all_metrics_in_eval_mode_and_restores_train_mode(tmp_path):
    G, ex = ToyGenerator(), PooledPixels()
    ref = generator_reference(G, 2000, seed=123, ex=ex, tmp_path=tmp_path)
    G.train()
    out = evaluate_generator(G, num_classes=4, dim_z=16, num_samples=2000, batch_size=256, extractor=ex,
                             ref_stats=ref, truncation=0.0, device="cpu", seed=0)
    assert set(out) == {"fid", "is_mean", "is_std", "precision_pooled", "recall_pooled"}  # the extractor's space
    assert G.training and not any(G.seen_training)
    # same generator, other draws: FID small, precision/recall high (k-NN manifolds in 48-D from 2000
    # samples do not reach 1 even for one distribution)
    assert 0 <= out["fid"] < 0.02 and out["precision_pooled"] > 0.75 and out["recall_pooled"] > 0.75
    assert out["is_mean"] > 1.0

    worse = ToyGenerator(scale=0.05)  # different weights: much less variety
    bad = evaluate_generator(worse, num_classes=4, dim_z=16, num_samples=2000, batch_size=256, extractor=ex,
                             ref_stats=ref, device="cpu", seed=0)
    assert bad["fid"] > 10 * out["fid"] and bad["recall_pooled"] < out["recall_pooled"]


def test_evaluate_generator_is_deterministic_given_the_seed_and_accepts_a_stats_file(tmp_path):
    G, ex = ToyGenerator(), PooledPixels()
    ref = generator_reference(G, 500, seed=1, ex=ex, tmp_path=tmp_path)
    kwargs = dict(num_classes=4, dim_z=16, num_samples=300, batch_size=64, extractor=ex, device="cpu", seed=7)
    a = evaluate_generator(G, ref_stats=ref, **kwargs)
    b = evaluate_generator(G, ref_stats=tmp_path / "ref_1.npz", **kwargs)
    assert a == b


def test_evaluate_generator_rejects_statistics_from_another_extractor(tmp_path):
    G, ex = ToyGenerator(), PooledPixels()
    ref = generator_reference(G, 100, seed=1, ex=ex, tmp_path=tmp_path)
    ref = ReferenceStats(ref.mu, ref.sigma, ref.count, "inception", ref.resolution)
    with pytest.raises(ValueError, match="inception"):
        evaluate_generator(G, num_classes=4, dim_z=16, num_samples=10, batch_size=10, extractor=ex, ref_stats=ref)


def test_evaluate_generator_reports_nan_for_non_finite_images(tmp_path):
    G, ex = ToyGenerator(), PooledPixels()
    ref = generator_reference(G, 100, seed=1, ex=ex, tmp_path=tmp_path)
    with torch.no_grad():
        G.proj.fill_(float("nan"))
    out = evaluate_generator(G, num_classes=4, dim_z=16, num_samples=50, batch_size=25, extractor=ex, ref_stats=ref)
    assert all(math.isnan(v) for v in out.values()) and "fid" in out


def test_truncated_normal_resamples_beyond_the_threshold_and_zero_means_none():
    g = torch.Generator().manual_seed(0)
    z = truncated_normal(4000, 8, 0.5, g)
    assert z.shape == (4000, 8) and z.abs().max() <= 0.5 and z.std() < 0.35
    plain = truncated_normal(4000, 8, 0.0, torch.Generator().manual_seed(0))
    assert plain.abs().max() > 2.5


def test_truncation_sweep_evaluates_each_threshold_and_plots_png(tmp_path):
    G, ex = ToyGenerator(), PooledPixels()
    ref = generator_reference(G, 1000, seed=1, ex=ex, tmp_path=tmp_path)
    results = truncation_sweep(G, [0.0, 1.0, 0.25], num_classes=4, dim_z=16, num_samples=500, batch_size=250,
                               extractor=ex, ref_stats=ref, device="cpu", seed=0)
    assert [r["truncation"] for r in results] == [0.0, 1.0, 0.25]
    fids = {r["truncation"]: r["fid"] for r in results}
    assert fids[0.25] > fids[1.0] > fids[0.0]  # stronger truncation = less variety = farther from the data
    png = plot_truncation_sweep(results, tmp_path / "plots" / "sweep.png")
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 300
    fid_only = [{k: v for k, v in r.items() if not k.startswith("is_")} for r in results]
    with Image.open(plot_truncation_sweep(fid_only, tmp_path / "fid_only.png")) as im:
        assert im.format == "PNG"


def test_evaluate_generator_runs_a_biggan_generator_with_the_dataset_classifier(tmp_path):
    """The trainer's path on real components: BigGAN G (after standing stats), classifier features."""
    models = pytest.importorskip("models")
    from models.sampling import standing_stats
    from pipeline.metrics import ClassifierExtractor, train_classifier

    g = torch.Generator().manual_seed(0)
    real = (torch.rand(200, 3, 32, 32, generator=g) * 2 - 1) * 0.5
    labels = torch.arange(200) % 4
    real[:, 0] += labels.view(-1, 1, 1).float() * 0.1  # a little class signal
    ex = ClassifierExtractor(train_classifier(real, labels, 4, epochs=1, width=8, feature_dim=16))
    ref = reference_stats([(real[:100], labels[:100]), (real[100:], labels[100:])], ex,
                          reference_stats_path(tmp_path, ex, 32, 200))
    torch.manual_seed(0)
    G = models.build_generator("biggan", 32, 4, ch=4, dim_z=32, shared_dim=8, attention=0)
    standing_stats(G, num_passes=2, batch_size=16)
    out = evaluate_generator(G, num_classes=4, dim_z=G.dim_z, num_samples=64, batch_size=32, extractor=ex,
                             ref_stats=ref, truncation=1.0, device="cpu", seed=0)
    assert set(out) == {"fid", "is_mean", "is_std", "precision_classifier", "recall_classifier"}
    assert all(math.isfinite(v) for v in out.values()) and out["fid"] > 0
