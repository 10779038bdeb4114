"""BigGAN / BigGAN-deep architectures: shapes, conditioning, parameter counts, config validation."""

from __future__ import annotations

import pytest
import torch

from models import build_discriminator, build_generator
from models import registry as model_registry
from models.biggan import Generator
from models.layers import Attention

ARCH_CH = {"biggan": 8, "biggan-deep": 4}  # smallest widths that still fit every attention block


def _small(arch: str, resolution: int, num_classes: int = 5, **kw):
    kw = {"ch": ARCH_CH[arch], "dim_z": 16 if arch == "biggan-deep" else None, "shared_dim": 8, **kw}
    torch.manual_seed(0)
    return (build_generator(arch, resolution, num_classes, **kw),
            build_discriminator(arch, resolution, num_classes, **kw))


@pytest.mark.parametrize("resolution", [32, 64, 128, 256, 512])
@pytest.mark.parametrize("arch", ["biggan", "biggan-deep"])
def test_generator_and_discriminator_shapes_at_every_resolution(arch, resolution):
    G, D = _small(arch, resolution)
    assert (G.resolution, G.num_classes, D.resolution, D.num_classes) == (resolution, 5, resolution, 5)
    z = torch.randn(2, G.dim_z)
    y = torch.tensor([0, 4])
    with torch.no_grad():
        x = G(z, y)
        logits = D(x, y)
    assert x.shape == (2, 3, resolution, resolution)
    assert x.dtype == torch.float32
    assert torch.isfinite(x).all() and x.abs().max() <= 1.0
    assert logits.shape == (2,)
    assert torch.isfinite(logits).all()


def test_default_attention_sits_where_the_released_models_have_it():
    with torch.device("meta"):
        G128 = build_generator("biggan", 128)
        G256 = build_generator("biggan", 256)
        D64 = build_discriminator("biggan", 64)
        G32 = build_generator("biggan-deep", 32)

    def attention_channels(net):
        return [m.channels for m in net.modules() if isinstance(m, Attention)]

    assert attention_channels(G128) == [2 * 96]  # 64 px stage of G: 2ch
    assert attention_channels(G256) == [2 * 96]  # 128 px stage at 256 px
    assert attention_channels(D64) == []  # D at 64 px has no 64 px stage
    assert attention_channels(G32) == []
    assert G128.config.attention == (64,) and G256.config.attention == (128,)


# (arch, resolution) -> (G params, D params), the reference implementation's counts at 1000 classes.
PAPER_COUNTS = {
    ("biggan", 128): (70_433_988, 87_982_370),
    ("biggan", 256): (82_097_604, 99_191_330),
    ("biggan-deep", 128): (50_244_484, 34_590_210),
    ("biggan-deep", 256): (55_736_708, 38_247_426),
}


@pytest.mark.parametrize(("arch", "resolution"), sorted(PAPER_COUNTS))
def test_parameter_counts_match_the_reference(arch, resolution):
    with torch.device("meta"):
        G = build_generator(arch, resolution)
        D = build_discriminator(arch, resolution)
    counts = (sum(p.numel() for p in G.parameters()), sum(p.numel() for p in D.parameters()))
    assert counts == PAPER_COUNTS[(arch, resolution)]
    assert G.shared.weight.numel() == 128_000
    assert all(p.is_meta for p in G.parameters())  # nothing was allocated


def test_paper_defaults_are_resolved():
    with torch.device("meta"):
        G = build_generator("biggan", 128)
        Gd = build_generator("biggan-deep", 256)
    assert (G.dim_z, G.config.ch, G.config.shared_dim, G.config.hier) == (120, 96, 128, True)
    assert G.linear.in_features == 20  # one of six z chunks
    assert G.blocks[0][0].bn1.gain.in_features == 128 + 20  # shared embedding + z chunk
    assert (Gd.dim_z, Gd.config.ch, Gd.config.depth) == (128, 128, 2)
    assert Gd.linear.in_features == 256  # whole z + shared embedding
    assert G.config.to_dict()["attention"] == [64]


def test_class_label_changes_the_image_and_the_logit():
    G, D = _small("biggan", 32, attention=16)
    G.eval()
    D.eval()
    z = torch.randn(1, G.dim_z).repeat(2, 1)
    y = torch.tensor([1, 2])
    with torch.no_grad():
        x = G(z, y)
        assert (x[0] - x[1]).abs().max() > 1e-3
        logits = D(x[:1].repeat(2, 1, 1, 1), y)
    assert (logits[0] - logits[1]).abs() > 1e-5


@pytest.mark.parametrize("arch", ["biggan", "biggan-deep"])
def test_every_part_of_z_reaches_the_image(arch):
    # Skip-z: the last chunk of z only enters through the last stage's conditional BNs (BigGAN).
    G, _ = _small(arch, 64)
    G.eval()
    z = torch.randn(1, G.dim_z)
    z2 = z.clone()
    z2[:, -4:] += 1.0
    with torch.no_grad():
        diff = (G(z, torch.tensor([3])) - G(z2, torch.tensor([3]))).abs().max()
    assert diff > 1e-4


def test_generator_accepts_class_embeddings_for_interpolation():
    G, _ = _small("biggan", 32)
    G.eval()
    z = torch.randn(2, G.dim_z)
    y = torch.tensor([1, 3])
    with torch.no_grad():
        torch.testing.assert_close(G(z, y), G(z, G.shared(y)))
        mixed = 0.5 * (G.shared(y[:1]) + G.shared(y[1:]))
        assert G(z[:1], mixed).shape == (1, 3, 32, 32)


@pytest.mark.parametrize("arch", ["biggan", "biggan-deep"])
def test_bf16_and_channels_last(arch):
    G, D = _small(arch, 64)
    z = torch.randn(2, G.dim_z)
    y = torch.tensor([0, 1])
    with torch.no_grad():
        x = G(z, y)
        ref = D(x, y)
        out_cl = D(x.contiguous(memory_format=torch.channels_last), y)
    torch.testing.assert_close(out_cl, ref, rtol=1e-4, atol=1e-4)

    # Autocast bf16 (the trainer's mixed precision) and a model cast to bf16 (DeepSpeed bf16).
    with torch.autocast("cpu", dtype=torch.bfloat16):
        xa = G(z, y)
        la = D(xa, y)
    assert torch.isfinite(xa.float()).all() and torch.isfinite(la.float()).all()
    G16, D16 = G.to(torch.bfloat16), D.to(torch.bfloat16)
    x16 = G16(z.bfloat16(), y)
    l16 = D16(x16.contiguous(memory_format=torch.channels_last), y)
    assert x16.dtype == torch.bfloat16 and l16.dtype == torch.bfloat16
    (l16.float().mean() + x16.float().mean()).backward()
    assert torch.isfinite(G16.linear.weight.grad.float()).all()


def test_discriminator_survives_two_calls_before_backward():
    # The D step calls D on fakes and reals separately; SN buffer updates must not break backward.
    G, D = _small("biggan-deep", 32)
    x = torch.randn(2, 3, 32, 32)
    y = torch.tensor([0, 1])
    loss = torch.relu(1 - D(x, y)).mean() + torch.relu(1 + D(G(torch.randn(2, G.dim_z), y).detach(), y)).mean()
    loss.backward()
    assert all(p.grad is not None for p in D.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"arch": "stylegan"}, "arch"),
        ({"resolution": 100}, "resolution"),
        ({"ch": 0}, "ch"),
        ({"ch": 2.5}, "ch"),
        ({"dim_z": 121}, "dim_z"),  # hierarchical BigGAN at 128 px needs a multiple of 6
        ({"attention": 48}, "attention"),
        ({"attention": "64"}, "attention"),
        ({"depth": 0}, "depth"),
        ({"hier": "yes"}, "hier"),
        ({"bn_eps": -1.0}, "bn_eps"),
        ({"num_sv_itrs": 0}, "num_sv_itrs"),
        ({"num_classes": 0}, "num_classes"),
        ({"widht": 3}, "widht"),
    ],
)
def test_bad_settings_raise_value_error_naming_the_field(kwargs, field):
    args = {"arch": "biggan", "resolution": 128, "num_classes": 10, **kwargs}
    with pytest.raises(ValueError, match=field):
        with torch.device("meta"):
            build_generator(args.pop("arch"), args.pop("resolution"), args.pop("num_classes"), **args)


def test_none_means_default_and_zero_attention_means_none():
    with torch.device("meta"):
        G = build_generator("biggan-deep", 128, ch=None, dim_z=None, attention=0)
        D = build_discriminator("biggan-deep", 128, attention=None, dim_z=64)  # dim_z ignored by D
    assert G.config.ch == 128 and G.config.attention == ()
    assert not any(isinstance(m, Attention) for m in [*G.modules(), *D.modules()])


def test_one_settings_dict_feeds_both_networks():
    # As in the reference: a 64 px attention setting gives G (64 px stage) attention and D none;
    # BigGAN ignores depth, D ignores G-only keys.
    shared = {"ch": 8, "dim_z": 20, "shared_dim": 8, "depth": 2, "attention": 64, "bn_eps": 1e-4}
    with torch.device("meta"):
        G = build_generator("biggan", 64, 10, **shared)
        D = build_discriminator("biggan", 64, 10, **shared)
    assert [m.channels for m in G.modules() if isinstance(m, Attention)] == [16]
    assert not any(isinstance(m, Attention) for m in D.modules())
    assert G.config.depth == 1 and D.config.attention == ()


@pytest.mark.parametrize(("arch", "resolution"), [("biggan", 256), ("biggan-deep", 64)])
def test_a_resolved_config_rebuilds_the_same_network(arch, resolution):
    with torch.device("meta"):
        G = build_generator(arch, resolution, 10, ch=8)
        D = build_discriminator(arch, resolution, 10, ch=8)
        G2 = build_generator(arch, resolution, 10, **G.config.overrides())
        D2 = build_discriminator(arch, resolution, 10, **D.config.overrides())
    assert G2.config == G.config and D2.config == D.config
    assert [p.shape for p in D2.parameters()] == [p.shape for p in D.parameters()]


def test_a_new_architecture_is_one_registry_line(monkeypatch):
    monkeypatch.setitem(model_registry._ARCHS, "tiny", model_registry._ARCHS["biggan"])
    assert "tiny" in model_registry.available_archs()
    with torch.device("meta"):
        assert isinstance(build_generator("tiny", 32, ch=8), Generator)
