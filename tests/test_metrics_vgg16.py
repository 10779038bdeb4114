"""VGG16-feature precision/recall (NVIDIA's pr50k3 features) with a small TorchScript stand-in of the same
interface: NVIDIA's vgg16.pt itself is a download (nvlabs-fi-cdn.nvidia.com), which this machine cannot make."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.metrics import (
    ReferenceStats,
    VGG16Extractor,
    VGG16WeightsNotFound,
    build_extractor,
    compute_reference_stats,
    evaluate_generator,
    generate,
    precision_recall,
    vgg16_weights_path,
)
from pipeline.metrics.vgg16 import ENV_VAR, NVIDIA_URL
from tests.test_metrics import PooledPixels, ToyGenerator, generator_reference


class TinyVGG16Interface(nn.Module):
    """NVIDIA's vgg16.pt calling convention: uint8 RGB (N, 3, H, W) of any size in, (N, D) features out with
    return_features=True; it resizes internally. A few random conv/linear layers instead of VGG16's weights."""

    def __init__(self, features: int = 24):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8 * 16, features)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, img: Tensor, resize_images: bool = True, return_lpips: bool = False,
                return_features: bool = False) -> Tensor:
        if img.dtype != torch.uint8:
            raise RuntimeError("expects uint8 images")
        x = img.to(torch.float32)
        if resize_images and (x.shape[2] != 16 or x.shape[3] != 16):
            x = F.interpolate(x, size=(16, 16), mode="area")
        h = F.adaptive_avg_pool2d(torch.relu(self.conv((x - 128.0) / 128.0)), 4).flatten(1)
        features = self.fc(h)
        if return_features:
            return features
        return features.sum(dim=1)


def write_tiny_vgg16(path) -> str:
    torch.jit.script(TinyVGG16Interface()).save(str(path))
    return str(path)


@pytest.fixture()
def tiny_vgg(tmp_path):
    return write_tiny_vgg16(tmp_path / "vgg16.pt")


def test_vgg16_is_off_unless_configured_and_a_missing_file_says_where_to_get_it(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert vgg16_weights_path("") is None  # nothing configured: VGG16 precision/recall is off, no error
    with pytest.raises(VGG16WeightsNotFound) as err:
        vgg16_weights_path(str(tmp_path / "vgg16.pt"))
    text = str(err.value)
    assert "eval.vgg16_weights" in text and ENV_VAR in text and NVIDIA_URL in text and "does not exist" in text
    with pytest.raises(VGG16WeightsNotFound, match="No VGG16 weights configured"):
        build_extractor("vgg16")
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "other.pt"))
    with pytest.raises(VGG16WeightsNotFound, match=f"from \\${ENV_VAR}"):
        vgg16_weights_path("")


def test_files_that_are_not_nvidias_vgg16_are_rejected(tmp_path):
    junk = tmp_path / "junk.pt"
    torch.save({"weight": torch.zeros(2)}, junk)
    with pytest.raises(ValueError, match="not a TorchScript file"):
        VGG16Extractor.from_weights(junk)
    other = tmp_path / "plain.pt"
    torch.jit.script(nn.Linear(3, 2)).save(str(other))  # TorchScript, but not the interface
    with pytest.raises(ValueError, match="not NVIDIA's VGG16 interface"):
        VGG16Extractor.from_weights(other)


def test_extractor_feeds_uint8_rgb_and_returns_the_networks_features(tiny_vgg, monkeypatch):
    monkeypatch.setenv(ENV_VAR, tiny_vgg)
    ex = build_extractor("vgg16", batch_size=3)  # the file from $BIGGAN_VGG16_WEIGHTS
    assert ex.name == "vgg16" and ex.space == "vgg16" and ex.feature_dim == 24 and not ex.has_logits
    images = torch.rand(5, 3, 20, 20) * 2 - 1
    feats, logits = ex.features_and_logits(images)
    assert feats.shape == (5, 24) and logits is None and feats.dtype == torch.float32
    levels = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)  # what NVIDIA feeds: 8-bit levels
    direct = torch.jit.load(tiny_vgg)(levels, return_features=True)
    torch.testing.assert_close(feats, direct, rtol=1e-5, atol=1e-5)  # batches of 3 vs 5: float round-off
    gray = ex.features(images[:, :1])
    torch.testing.assert_close(gray, ex.features(images[:, :1].expand(-1, 3, -1, -1)), rtol=1e-5, atol=1e-5)


def test_precision_recall_in_vgg16_features_next_to_the_main_space(tiny_vgg, tmp_path):
    G, ex, vgg = ToyGenerator(), PooledPixels(), VGG16Extractor.from_weights(tiny_vgg)
    ref = generator_reference(G, 400, seed=1, ex=ex, tmp_path=tmp_path)
    real = torch.cat([imgs for imgs, _ in generate(G, num_classes=4, dim_z=16, num_samples=300, batch_size=100,
                                                    seed=9)])
    real_vgg = compute_reference_stats([real], vgg, keep_features=300, moments=False)
    assert real_vgg.mu.size == 0 and real_vgg.sigma.size == 0 and real_vgg.features.shape == (300, 24)
    out = evaluate_generator(G, num_classes=4, dim_z=16, num_samples=250, batch_size=64, extractor=ex, ref_stats=ref,
                             seed=0, pr_samples=150, pr_spaces=[(vgg, real_vgg)])
    assert set(out) == {"fid", "is_mean", "is_std", "precision_pooled", "recall_pooled", "precision_vgg16",
                        "recall_vgg16"}
    # as pr50k3: every real row (300) against the first pr_samples (150) generated samples' VGG16 features
    fake = torch.cat([imgs for imgs, _ in generate(G, num_classes=4, dim_z=16, num_samples=250, batch_size=64,
                                                    seed=0)])[:150]
    expected = precision_recall(real_vgg.features, vgg.features(fake).numpy())
    assert (out["precision_vgg16"], out["recall_vgg16"]) == expected
    assert 0 < out["precision_vgg16"] <= 1 and 0 < out["recall_vgg16"] <= 1
    with pytest.raises(ValueError, match="needs real 'vgg16' features"):
        evaluate_generator(G, num_classes=4, dim_z=16, num_samples=20, batch_size=10, extractor=ex, ref_stats=ref,
                           pr_spaces=[(vgg, ReferenceStats(np.zeros(0), np.zeros((0, 0)), 5, "vgg16", 8))])
