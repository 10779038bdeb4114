"""Pretrained BigGAN-deep loading: same images as pytorch-pretrained-biggan's model for the same inputs.

Their model is built at random init (nothing is downloaded) with its batch-norm truncation tables,
attention gamma and output BN randomized, so a loader that dropped or misplaced any of them fails.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

pytorch_pretrained_biggan = pytest.importorskip("pytorch_pretrained_biggan")
from pytorch_pretrained_biggan import BigGAN, BigGANConfig  # noqa: E402

from models.pretrained import (  # noqa: E402
    generator_from_pretrained_config,
    load_biggan_deep,
    load_pretrained_state_dict,
)

NUM_CLASSES = 10
Z_DIM = 16
# The released models' layer lists (pytorch_pretrained_biggan.convert_tf_to_pytorch.BigGAN128/256/512).
_STAGES = {128: [16, 16, 8, 4, 2, 1], 256: [16, 16, 8, 8, 4, 2, 1], 512: [16, 16, 8, 8, 4, 2, 1, 1]}


def _layers(resolution: int) -> list[tuple[bool, int, int]]:
    mult = _STAGES[resolution]
    return [layer for i, o in zip(mult, mult[1:]) for layer in ((False, i, i), (True, i, o))]



@torch.no_grad()
def _their_model(resolution: int, ch: int, seed: int = 0) -> tuple[BigGAN, BigGANConfig]:
    torch.manual_seed(seed)
    config = BigGANConfig(output_dim=resolution, z_dim=Z_DIM, class_embed_dim=Z_DIM, channel_width=ch,
                          num_classes=NUM_CLASSES, layers=_layers(resolution), attention_layer_position=8,
                          eps=1e-4, n_stats=51)
    model = BigGAN(config).eval()
    for name, buf in model.named_buffers():
        if name.endswith("running_means"):
            buf.normal_(0.0, 0.5)
        elif name.endswith("running_vars"):
            buf.uniform_(0.5, 2.0)
    for module in model.modules():
        if hasattr(module, "weight_orig"):
            # Converged power-iteration vectors (released weights have them); random ones make
            # u^T W v tiny and the activations explode.
            u, _, vh = torch.linalg.svd(module.weight_orig.flatten(1), full_matrices=False)
            module.weight_u.copy_(u[:, 0])
            module.weight_v.copy_(vh[0])
    for name, p in model.named_parameters():
        if name.endswith("gamma"):
            p.fill_(0.8)
        elif name == "generator.bn.weight":
            p.uniform_(0.5, 1.5)
        elif name == "generator.bn.bias":
            p.normal_(0.0, 0.3)
        elif name.endswith("bias"):
            p.normal_(0.0, 0.1)
    return model, config


def _save(model: BigGAN, config: BigGANConfig, path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(config.to_json_string())
    torch.save(model.state_dict(), path / "pytorch_model.bin")


def _inputs(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, Z_DIM, generator=g).clamp(-2, 2) * 0.5
    y = torch.randint(NUM_CLASSES, (n,), generator=g)
    return z, y


@pytest.mark.parametrize(
    ("resolution", "ch", "n", "truncations"),
    [(128, 8, 2, (0.4, 0.437, 1.0, 0.131)), (256, 4, 1, (0.263,)), (512, 4, 1, (0.713,))],
)
def test_loaded_generator_reproduces_pytorch_pretrained_biggan(tmp_path, resolution, ch, n, truncations):
    theirs, config = _their_model(resolution, ch)
    _save(theirs, config, tmp_path)
    G = load_biggan_deep(tmp_path)
    assert not G.training and G.resolution == resolution and G.output_conv.out_channels == 3
    z, y = _inputs(n)
    one_hot = F.one_hot(y, NUM_CLASSES).float()
    with torch.no_grad():
        for t in truncations:
            expected = theirs(z, one_hot, t)
            got = G(z, y, truncation=t)
            assert got.shape == expected.shape == (n, 3, resolution, resolution)
            assert expected.std() > 0.05  # a non-trivial image, so agreement means something
            assert (got - expected).abs().max().item() < 1e-4, t


def test_truncation_selects_the_batch_norm_statistics(tmp_path):
    theirs, config = _their_model(128, 8)
    _save(theirs, config, tmp_path)
    G = load_biggan_deep(tmp_path)
    z, y = _inputs(2)
    with torch.no_grad():
        low, high, default = G(z, y, truncation=0.4), G(z, y, truncation=1.0), G(z, y)
    assert (low - high).abs().max() > 1e-2
    torch.testing.assert_close(default, high)  # running stats are the truncation-1.0 row
    with pytest.raises(ValueError, match="truncation"):
        G(z, y, truncation=1.5)


def test_loaded_weights_round_trip_through_our_state_dict(tmp_path):
    theirs, config = _their_model(128, 8, seed=4)
    _save(theirs, config, tmp_path)
    G = load_biggan_deep(tmp_path)
    fresh = generator_from_pretrained_config(json.loads((tmp_path / "config.json").read_text()))
    fresh.load_state_dict(G.state_dict())  # truncation tables included
    fresh.eval()
    z, y = _inputs(2)
    with torch.no_grad():
        torch.testing.assert_close(fresh(z, y, truncation=0.3), G(z, y, truncation=0.3), rtol=0, atol=0)
    # conv_to_rgb was folded: our 3-filter layer divides by their full layer's sigma.
    their_rgb = theirs.generator.conv_to_rgb
    their_sigma = torch.dot(their_rgb.weight_u, their_rgb.weight_orig.flatten(1) @ their_rgb.weight_v)
    torch.testing.assert_close(G.output_conv.sigma0, their_sigma)
    # Fine-tuning starts cleanly: a training-mode forward renormalizes the folded layer's u.
    G.train()
    out = G(*_inputs(4))
    assert torch.isfinite(out).all()
    assert G.output_conv.u.norm().item() == pytest.approx(1.0, abs=1e-5)


def test_loader_rejects_mismatched_configs_and_weights(tmp_path):
    theirs, config = _their_model(128, 8)
    cfg = json.loads(config.to_json_string())
    with pytest.raises(ValueError, match="attention"):
        generator_from_pretrained_config({**cfg, "attention_layer_position": 7})
    with pytest.raises(ValueError, match="layers"):
        generator_from_pretrained_config({**cfg, "layers": _layers(256)})
    state = theirs.state_dict()
    state.pop("generator.layers.3.bn_2.running_vars")
    with pytest.raises(ValueError, match="running_vars"):
        load_pretrained_state_dict(generator_from_pretrained_config(cfg), state)
    state = theirs.state_dict()
    state["generator.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="did not use"):
        load_pretrained_state_dict(generator_from_pretrained_config(cfg), state)
