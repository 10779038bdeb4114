"""Spectral norm: sigma0 is the top singular value, free to read, and eval mode matches torch's SN."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models import build_discriminator, build_generator
from models.spectral import (
    SNConv2d,
    SNEmbedding,
    SNLinear,
    SpectralNorm,
    first_layer_sigma0,
    set_spectral_norm,
    sigma0s,
)


def _top_sv(layer: SpectralNorm) -> torch.Tensor:
    return torch.linalg.svdvals(layer.weight.detach().flatten(1).double())[0].float()


@pytest.mark.parametrize(
    "make",
    [
        lambda: SNLinear(40, 24),
        lambda: SNConv2d(6, 10, kernel_size=3, padding=1),
        lambda: SNEmbedding(12, 7),
    ],
    ids=["linear", "conv", "embedding"],
)
def test_sigma0_converges_to_the_top_singular_value(make):
    torch.manual_seed(0)
    layer = make()
    with torch.no_grad():
        layer.weight.normal_(0, 1.0)  # a random spectrum, not the flat one of orthogonal init
    x = torch.randint(0, 12, (3,)) if isinstance(layer, SNEmbedding) else (
        torch.randn(3, 6, 5, 5) if isinstance(layer, SNConv2d) else torch.randn(3, 40))
    layer.train()
    first = layer.sigma0.clone()
    for _ in range(200):
        layer(x)
    assert not torch.equal(first, layer.sigma0)
    torch.testing.assert_close(layer.sigma0, _top_sv(layer), rtol=1e-4, atol=0)
    # The normalized weight then has spectral norm 1.
    w_sn = layer.normalized_weight().detach().flatten(1)
    assert torch.linalg.svdvals(w_sn)[0] == pytest.approx(1.0, abs=1e-4)


def test_every_layer_of_a_model_reports_its_top_singular_value():
    torch.manual_seed(0)
    G = build_generator("biggan-deep", 32, 4, ch=4, dim_z=8, shared_dim=8, num_sv_itrs=100)
    with torch.no_grad():
        for m in G.modules():
            if isinstance(m, SpectralNorm):
                m.weight.normal_()
    G.train()
    G(torch.randn(2, 8), torch.tensor([0, 3]))
    sig = sigma0s(G)
    assert "linear" in sig and len(sig) == sum(isinstance(m, SpectralNorm) for m in G.modules())
    modules = dict(G.named_modules())
    for name, s in sig.items():
        assert s.dim() == 0
        torch.testing.assert_close(s, _top_sv(modules[name]), rtol=2e-3, atol=0, msg=name)
    assert first_layer_sigma0(G) is G.linear.sigma0


def test_sigma0_is_a_buffer_read_without_computation():
    D = build_discriminator("biggan", 32, 3, ch=8)
    sig = sigma0s(D)
    state = D.state_dict()
    for name, s in sig.items():
        assert s is dict(D.named_buffers())[f"{name}.sigma0"]
        assert f"{name}.sigma0" in state
    assert "embed" in sig and "linear" in sig  # projection head layers are SN'd too


def test_eval_mode_uses_stored_vectors_without_updating_them():
    torch.manual_seed(0)
    conv = SNConv2d(4, 6)
    with torch.no_grad():
        conv.weight.normal_()
    conv.train()
    conv(torch.randn(1, 4, 5, 5))
    conv.eval()
    before = {k: v.clone() for k, v in conv.named_buffers()}
    x = torch.randn(2, 4, 5, 5)
    out = conv(x)
    for k, v in conv.named_buffers():
        assert torch.equal(v, before[k]), k
    sigma = torch.dot(conv.u, conv.weight.flatten(1) @ conv.v)
    torch.testing.assert_close(out, F.conv2d(x, conv.weight / sigma, conv.bias, padding=1))


def test_eval_mode_matches_torch_spectral_norm():
    torch.manual_seed(0)
    ref = torch.nn.utils.spectral_norm(torch.nn.Linear(9, 5))
    ref.train()
    ref(torch.randn(2, 9))  # one power iteration so u, v are non-trivial
    ref.eval()
    ours = SNLinear(9, 5).eval()
    with torch.no_grad():
        ours.weight.copy_(ref.weight_orig)
        ours.bias.copy_(ref.bias)
        ours.u.copy_(ref.weight_u)
        ours.v.copy_(ref.weight_v)
    x = torch.randn(4, 9)
    torch.testing.assert_close(ours(x), ref(x))


def test_gradient_flows_through_sigma():
    # W / sigma(W) is invariant to scaling W, so its gradient is orthogonal to W (Euler's theorem);
    # with sigma detached from W's graph it would not be.
    torch.manual_seed(0)
    lin = SNLinear(6, 6, bias=False, num_itrs=50)
    with torch.no_grad():
        lin.weight.normal_()
    lin.train()
    lin(torch.randn(1, 6))
    lin.num_itrs = 1
    x = torch.randn(8, 6)
    lin(x).pow(2).sum().backward()
    g = lin.weight.grad
    assert g.norm() > 0
    assert torch.sum(g * lin.weight.detach()).abs() < 1e-4 * g.norm() * lin.weight.norm()


def test_spectral_norm_switched_off_trains_on_raw_weights_and_still_reads_sigma0():
    torch.manual_seed(0)
    layer = SNConv2d(4, 6, kernel_size=3, padding=1)
    with torch.no_grad():
        layer.weight.mul_(5.0)  # top singular value far from 1, so normalized and raw outputs differ
    x = torch.randn(2, 4, 6, 6)
    layer.train()
    normalized = layer(x)
    assert set_spectral_norm(layer, False) == 1
    for _ in range(100):
        raw = layer(x)
    torch.testing.assert_close(raw, F.conv2d(x, layer.weight, layer.bias, padding=1))
    assert not torch.allclose(raw, normalized)
    torch.testing.assert_close(layer.sigma0, _top_sv(layer), rtol=1e-4, atol=0)  # still tracked
    raw.sum().backward()  # the gradient reaches the raw weight
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


def test_d_spectral_norm_false_builds_a_d_without_it_and_keeps_checkpoint_keys():
    from pipeline import config as C
    from pipeline.presets import get_preset
    from pipeline.trainer import build_models

    cfg = C.validate(C.apply_overrides(get_preset("demo"), ["model.num_classes=4", "model.d_spectral_norm=false"]))
    _, D_off = build_models(cfg)
    _, D_on = build_models(C.validate(C.apply_overrides(get_preset("demo"), ["model.num_classes=4"])))
    layers = [m for m in D_off.modules() if isinstance(m, SpectralNorm)]
    assert layers and not any(m.sn_on for m in layers)
    assert all(m.sn_on for m in D_on.modules() if isinstance(m, SpectralNorm))
    assert D_off.state_dict().keys() == D_on.state_dict().keys()  # an SN checkpoint loads into either
    with pytest.raises(C.ConfigError, match="model.d_spectral_norm: false needs model.arch biggan"):
        C.validate(C.apply_overrides(get_preset("demo"), ["model.arch=dcgan", "model.d_spectral_norm=false"]))
