"""Fine-tuning: `model.init_from` starts the trainer's G from a folder in pytorch-pretrained-biggan's layout.

The folder is written from that package's own BigGAN at a tiny width (random init: nothing is downloaded),
so the file's layout, key names and weight shapes are the real ones.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("pytorch_pretrained_biggan")
from pytorch_pretrained_biggan import BigGAN, BigGANConfig  # noqa: E402

from models.pretrained import load_biggan_deep  # noqa: E402
from pipeline.config import ConfigError  # noqa: E402
from pipeline.finetune import init_generator_from  # noqa: E402
from pipeline.trainer import build_models  # noqa: E402
from tests.data_helpers import write_id_shards  # noqa: E402
from tests.trainer_harness import make_trainer, tiny_config  # noqa: E402

CH, Z = 4, 16
_MULT = [16, 16, 8, 4, 2, 1]  # the released 128 px model's channel multipliers
LAYERS = [layer for i, o in zip(_MULT, _MULT[1:]) for layer in ((False, i, i), (True, i, o))]


@torch.no_grad()
def _write_their_model(path, num_classes: int, seed: int = 0) -> None:
    """Their BigGAN-deep 128 px at channel width 4, every parameter and buffer initialized (it leaves them empty)."""
    torch.manual_seed(seed)
    config = BigGANConfig(output_dim=128, z_dim=Z, class_embed_dim=Z, channel_width=CH, num_classes=num_classes,
                          layers=LAYERS, attention_layer_position=8, eps=1e-4, n_stats=51)
    model = BigGAN(config)
    for name, p in model.named_parameters():
        if name.endswith("gamma"):
            p.fill_(0.5)
        elif name.endswith("bias"):
            p.normal_(0.0, 0.1)
        elif name == "generator.bn.weight":
            p.uniform_(0.5, 1.5)
        else:
            p.normal_(0.0, 0.2)
    for name, b in model.named_buffers():
        if name.endswith("running_means"):
            b.normal_(0.0, 0.5)
        elif name.endswith("running_vars"):
            b.uniform_(0.5, 2.0)
    for module in model.modules():
        if hasattr(module, "weight_orig"):  # converged power-iteration vectors, as released weights have
            u, _, vh = torch.linalg.svd(module.weight_orig.flatten(1), full_matrices=False)
            module.weight_u.copy_(u[:, 0])
            module.weight_v.copy_(vh[0])
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(config.to_json_string())
    torch.save(model.state_dict(), path / "pytorch_model.bin")


def _file_weights(path) -> dict[str, torch.Tensor]:
    """What G must start from: the sampling loader's G, truncation tables dropped."""
    return {k: v for k, v in load_biggan_deep(path).state_dict().items() if not k.endswith(("stat_means", "stat_vars"))}


def _overrides(path, **more) -> dict:
    return {"model.arch": "biggan-deep", "model.resolution": 128, "model.shared_dim": Z, "model.bn_eps": 1e-4,
            "model.sn_eps": 1e-4, "model.attention": 64, "model.init_from": str(path), **more}


def test_trainer_starts_g_from_pretrained_weights_and_fine_tunes(tmp_path):
    n = 10
    shards = str(tmp_path / "shards")  # written directly: no Ray
    write_id_shards(tmp_path / "shards", [32], num_classes=n, resolution=32)
    weights = tmp_path / "biggan-deep-128"
    _write_their_model(weights, num_classes=n)
    small = {"data.batch_size": 4, "train.global_batch": 4, "loss.d_steps": 1}  # 128 px on CPU: keep it short
    cfg = tiny_config(tmp_path, shards, n, **_overrides(weights, **small))
    trainer = make_trainer(cfg, tmp_path)

    expected = _file_weights(weights)
    assert set(trainer.G.state_dict()) == set(expected)  # no truncation tables in the training G
    for name, module in (("G", trainer.G), ("EMA G", trainer.ema.model)):
        for k, v in module.state_dict().items():
            torch.testing.assert_close(v, expected[k], rtol=0, atol=0, msg=f"{name} {k}")
    torch.manual_seed(cfg.train.seed)
    _, fresh_d = build_models(cfg)  # D is not loaded: the same fresh D a run without init_from gets
    for k, v in fresh_d.state_dict().items():
        torch.testing.assert_close(trainer.D.state_dict()[k], v, rtol=0, atol=0, msg=k)

    for _ in range(2):
        trainer.train_iteration()
    metrics = trainer.take_metrics()
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values()), metrics
    # a few Adam steps of at most ~lr each: still the file's weights, moved a little
    for k in ("linear.weight", "blocks.0.0.conv2.weight", "output_bn.weight", "shared.weight"):
        moved = (trainer.G.state_dict()[k] - expected[k]).abs().max().item()
        assert 0 < moved < 10 * 2 * cfg.optim.g_lr, (k, moved)


def test_class_count_must_match_unless_a_fresh_class_embedding_is_asked_for(tmp_path):
    weights = tmp_path / "w"
    _write_their_model(weights, num_classes=10)
    cfg = tiny_config(tmp_path, "unused", 7, **_overrides(weights))
    G, _ = build_models(cfg)
    with pytest.raises(ConfigError, match=r"model.num_classes: 7, but .* have 10 classes.*model.init_from_new_classes"):
        init_generator_from(cfg, G)

    cfg.model.init_from_new_classes = True
    torch.manual_seed(5)
    G, _ = build_models(cfg)
    fresh_embedding = G.shared.weight.clone()
    init_generator_from(cfg, G)
    expected = _file_weights(weights)
    for k, v in G.state_dict().items():
        if k == "shared.weight":
            torch.testing.assert_close(v, fresh_embedding, rtol=0, atol=0)  # 7 fresh rows
        else:
            torch.testing.assert_close(v, expected[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize(("override", "message"), [
    ({"model.resolution": 256}, r"model.resolution: 256, but .* 128 px; set model.resolution=128"),
    ({"model.arch": "biggan", "model.dim_z": 24, "model.attention": 0}, r"model.arch: 'biggan'.*set model.arch=biggan-deep"),
    ({"model.g_ch": 8}, r"model.g_ch: 8, but .* have 4; set model.g_ch=4"),
    ({"model.bn_eps": 1e-5, "model.shared_dim": 8}, r"model.shared_dim: 8.*set model.shared_dim=16.*model.bn_eps"),
    ({"model.attention": 32}, r"model.attention: \(32,\), but .* have \(64,\); set model.attention=64"),
])
def test_architecture_mismatches_name_the_field_and_the_files_value(tmp_path, override, message):
    weights = tmp_path / "w"
    _write_their_model(weights, num_classes=10)
    cfg = tiny_config(tmp_path, "unused", 10, **{**_overrides(weights), **override})
    with pytest.raises(ConfigError, match=message):
        init_generator_from(cfg, build_models(cfg)[0])


def test_init_from_must_be_a_pretrained_folder(tmp_path):
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "config.json").write_text("{}")
    for path, message in ((tmp_path / "nothing", "is not a directory"), (tmp_path / "w", "lacks .*pytorch_model.bin")):
        cfg = tiny_config(tmp_path, "unused", 10, **_overrides(path))
        with pytest.raises(ConfigError, match=f"model.init_from: .*{message}"):
            init_generator_from(cfg, build_models(cfg)[0])


@pytest.mark.parametrize("resolution", [128, 256, 512])
def test_the_documented_overrides_fit_the_released_models(resolution):
    """README: the imagenet128-deep preset at the file's resolution with bn_eps and sn_eps 1e-4 fits the released
    models' configs (BigGANConfig's defaults are biggan-deep-128's; 256/512 differ in output_dim and layers)."""
    from models.pretrained import pretrained_mismatches
    from pipeline.presets import get_preset

    mult = {128: [16, 16, 8, 4, 2, 1], 256: [16, 16, 8, 8, 4, 2, 1], 512: [16, 16, 8, 8, 4, 2, 1, 1]}[resolution]
    layers = [layer for i, o in zip(mult, mult[1:]) for layer in ((False, i, i), (True, i, o))]
    released = BigGANConfig(output_dim=resolution, layers=layers).__dict__
    cfg = get_preset("imagenet128-deep")
    cfg.model.resolution, cfg.model.bn_eps, cfg.model.sn_eps = resolution, 1e-4, 1e-4
    with torch.device("meta"):  # full width, not allocated
        G, _ = build_models(cfg)
    assert pretrained_mismatches(G, released) == {}
    cfg.model.bn_eps = 1e-5
    with torch.device("meta"):
        G, _ = build_models(cfg)
    assert pretrained_mismatches(G, released) == {"bn_eps": (1e-5, 1e-4)}
