"""DCGAN baseline: shapes at 32/64 px, conditioning, D options, registry builders, and the AC-GAN head."""

from __future__ import annotations

import pytest
import torch

from models.acgan import ACGANDiscriminator
from models.dcgan import DCGANDiscriminator, DCGANGenerator
from models.registry import available_archs, build_discriminator, build_generator
from models.sampling import standing_stats
from pipeline.losses import acgan_loss, gradient_penalty


@pytest.mark.parametrize("resolution", [32, 64])
@pytest.mark.parametrize("channels", [1, 3])
def test_generator_makes_images_in_range_at_32_and_64(resolution, channels):
    torch.manual_seed(0)
    g = DCGANGenerator(resolution, 10, ch=8, dim_z=16, out_channels=channels)
    x = g(torch.randn(4, 16), torch.tensor([0, 3, 5, 9]))
    assert x.shape == (4, channels, resolution, resolution)
    assert x.min().item() >= -1.0 and x.max().item() <= 1.0
    assert (g.dim_z, g.num_classes, g.resolution) == (16, 10, resolution)


@pytest.mark.parametrize("resolution", [32, 64])
@pytest.mark.parametrize("norm", ["batch", "none", "layer"])
@pytest.mark.parametrize("conditioning", ["projection", "concat"])
def test_discriminator_returns_one_logit_per_image(resolution, norm, conditioning):
    d = DCGANDiscriminator(resolution, 10, ch=8, in_channels=1, norm=norm, conditioning=conditioning)
    out = d(torch.randn(4, 1, resolution, resolution), torch.tensor([0, 3, 5, 9]))
    assert out.shape == (4,) and torch.isfinite(out).all()
    assert (d.num_classes, d.resolution) == (10, resolution)


def test_generator_output_depends_on_the_label():
    torch.manual_seed(0)
    g = DCGANGenerator(32, 10, ch=8, dim_z=16).eval()
    z = torch.randn(1, 16).expand(2, -1)
    x = g(z, torch.tensor([1, 7]))
    # NOTE: a fresh G in eval mode (running stats 0/1, weights N(0, 0.02)) makes tiny images; compare relatively
    assert (x[0] - x[1]).abs().max().item() > 0.05 * x.abs().max().item()
    with pytest.raises(ValueError, match="pass labels"):
        g(z)


@pytest.mark.parametrize("conditioning", ["projection", "concat"])
def test_discriminator_output_depends_on_the_label(conditioning):
    torch.manual_seed(0)
    d = DCGANDiscriminator(32, 10, ch=8, conditioning=conditioning).eval()
    x = torch.randn(1, 3, 32, 32).expand(2, -1, -1, -1)
    out = d(x, torch.tensor([1, 7]))
    assert abs(out[0].item() - out[1].item()) > 1e-5
    assert d(x, torch.tensor([1, 1]))[0].item() == pytest.approx(out[0].item())


def test_unconditional_models_ignore_labels():
    g, d = DCGANGenerator(32, 0, ch=8, dim_z=16).eval(), DCGANDiscriminator(32, 0, ch=8).eval()
    x = g(torch.randn(2, 16))
    assert d.conditioning == "none" and d(x).shape == (2,)


def test_layer_norm_critic_treats_samples_independently_and_batch_norm_does_not():
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    for norm, independent in (("layer", True), ("none", True), ("batch", False)):
        d = DCGANDiscriminator(32, 4, ch=8, norm=norm).train()
        whole = d(x, y)
        alone = torch.cat([d(x[i : i + 1], y[i : i + 1]) for i in range(4)])
        assert torch.allclose(whole, alone, atol=1e-5) == independent, norm


def test_registry_builds_dcgan_from_biggan_style_overrides():
    assert "dcgan" in available_archs()
    overrides = dict(ch=8, dim_z=32, shared_dim=16, hier=True, depth=None, attention=64, out_channels=1,
                     in_channels=1, bn_eps=1e-5, sn_eps=1e-6, num_sv_itrs=1)
    g = build_generator("dcgan", 32, 10, **overrides)
    d = build_discriminator("dcgan", 32, 10, norm="layer", **overrides)
    assert isinstance(g, DCGANGenerator) and isinstance(d, DCGANDiscriminator) and d.norm == "layer"
    x = g(torch.randn(3, 32), torch.tensor([0, 1, 2]))
    assert x.shape == (3, 1, 32, 32) and d(x, torch.tensor([0, 1, 2])).shape == (3,)
    defaults = build_generator("dcgan", 64, 10, ch=None, dim_z=None)
    assert (defaults.ch, defaults.dim_z) == (64, 100)


def test_bad_options_are_refused_by_name():
    with pytest.raises(ValueError, match="unknown option.*'G_ch'"):
        DCGANGenerator(32, 10, G_ch=8)
    with pytest.raises(ValueError, match="resolution"):
        DCGANGenerator(48, 10)
    with pytest.raises(ValueError, match="norm"):
        DCGANDiscriminator(32, 10, norm="spectral")
    with pytest.raises(ValueError, match="conditioning"):
        DCGANDiscriminator(32, 10, conditioning="cbn")
    with pytest.raises(ValueError, match="ch must be a positive int"):
        DCGANDiscriminator(32, 10, ch=0)


def test_acgan_head_returns_adversarial_and_class_logits_and_trains_both():
    torch.manual_seed(0)
    d = ACGANDiscriminator(build_discriminator("dcgan", 32, 10, ch=8, in_channels=1, norm="layer", attention=64))
    assert d.backbone.embed is None  # the projection term is replaced by the classifier, not left untrained
    assert (d.num_classes, d.resolution) == (10, 32)
    x, y = torch.randn(4, 1, 32, 32), torch.tensor([0, 3, 5, 9])
    adv, cls = d(x, y)
    assert adv.shape == (4,) and cls.shape == (4, 10)
    (adv.mean() + acgan_loss(cls, y)).backward()
    assert d.classifier.weight.grad.abs().sum() > 0 and d.backbone.linear.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in d.parameters())  # every weight trains
    gp = gradient_penalty(d, x, torch.randn_like(x), y, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(gp)


def test_acgan_head_refuses_what_it_cannot_wrap():
    with pytest.raises(ValueError, match="conditioning='concat'"):
        ACGANDiscriminator(DCGANDiscriminator(32, 10, ch=8, conditioning="concat"))
    with pytest.raises(ValueError, match="at least 2 classes"):
        ACGANDiscriminator(DCGANDiscriminator(32, 0, ch=8))
    with pytest.raises(TypeError, match="lacks"):
        ACGANDiscriminator(torch.nn.Linear(3, 1), 10)


def test_standing_stats_work_on_dcgan_generator():
    g = DCGANGenerator(32, 10, ch=8, dim_z=16)
    first_bn = g.net[1]
    before = first_bn.running_var.clone()
    standing_stats(g, num_passes=2, batch_size=8, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(before, first_bn.running_var) and g.training


@pytest.mark.parametrize("projection", [False, True], ids=["acgan", "projection+acgan"])
def test_biggan_discriminator_takes_an_acgan_head_alone_or_beside_its_projection(projection):
    torch.manual_seed(0)
    d = ACGANDiscriminator(build_discriminator("biggan", 32, 10, ch=8, attention=0), projection=projection)
    assert (d.backbone.embed is not None) == projection
    x = torch.randn(4, 3, 32, 32)
    d.eval()  # spectral norm's power iteration would move between the two calls
    adv, cls = d(x, torch.tensor([0, 3, 5, 9]))
    adv_other_labels, cls_other_labels = d(x, torch.tensor([1, 1, 1, 1]))
    assert adv.shape == (4,) and cls.shape == (4, 10)
    assert torch.equal(cls, cls_other_labels)  # the classifier reads the image, never the label
    # the kept projection makes the adversarial logit class-aware; without it D's logit ignores y
    assert torch.allclose(adv, adv_other_labels) != projection
    d.train()
    adv, cls = d(x, torch.tensor([0, 3, 5, 9]))
    (adv.mean() + acgan_loss(cls, torch.tensor([0, 3, 5, 9]))).backward()
    assert all(p.grad is not None for p in d.parameters())  # every weight trains, the embedding included


def test_projection_acgan_head_needs_a_projection_to_keep():
    with pytest.raises(ValueError, match="no projection embedding to keep"):
        ACGANDiscriminator(DCGANDiscriminator(32, 10, ch=8, conditioning="none"), projection=True)
