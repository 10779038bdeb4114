"""python -m pipeline.sample: class grids and slerp sheets from a checkpoint; save_grid."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import sample
from pipeline.config import RunConfig
from pipeline.sample import class_grid, load_generator, save_grid, save_labelled_grid, slerp

ROOT = Path(__file__).resolve().parent.parent
NAMES = ["tshirt", "trouser", "pullover", "dress", "coat"]


def tiny_config() -> RunConfig:
    cfg = RunConfig(preset="test")
    m = cfg.model
    m.arch, m.resolution, m.num_classes = "biggan", 32, len(NAMES)
    m.g_ch, m.d_ch, m.dim_z, m.shared_dim, m.attention = 4, 4, 32, 8, 0
    return cfg


def write_tiny_checkpoint(path, seed: int = 0):
    """A randomly initialised G in the trainer's weights-only format."""
    torch.manual_seed(seed)
    cfg = tiny_config()
    G = sample.build_generator(cfg, len(NAMES))
    torch.save({"g_ema_state": G.state_dict(), "config": cfg.to_dict(), "class_names": NAMES, "step": 7}, path)
    return path


def png(path):
    with Image.open(path) as im:
        return im.mode, im.size, np.asarray(im).copy()


def test_save_grid_lays_out_rows_with_padding_and_maps_the_value_range(tmp_path):
    images = torch.full((10, 3, 4, 6), -1.0)
    images[3] = 1.0
    mode, size, pixels = png(save_grid(images, tmp_path / "sub" / "grid.png", nrow=4, padding=2))
    assert mode == "RGB" and size == (4 * (6 + 2) + 2, 3 * (4 + 2) + 2)
    assert pixels[0, 0].tolist() == [255, 255, 255]  # padding is white
    assert pixels[2, 2].tolist() == [0, 0, 0]  # image 0 is -1 -> black
    assert pixels[2, 2 + 3 * 8].tolist() == [255, 255, 255]  # image 3 is +1 -> white
    mode, size, _ = png(save_grid(np.zeros((3, 1, 5, 5)), tmp_path / "gray.png", nrow=8))
    assert mode == "L" and size == (3 * 7 + 2, 7 + 2)  # nrow capped at N
    with pytest.raises(ValueError, match="expected images"):
        save_grid(torch.zeros(2, 2, 4, 4), tmp_path / "bad.png")


def test_labelled_grid_enlarges_the_grid_and_writes_each_row_label_beside_its_row(tmp_path):
    images = torch.full((6, 1, 4, 4), -1.0)  # black images, two rows of three
    out = save_labelled_grid(images, tmp_path / "g.png", ["a short", "a much longer label"], nrow=3, scale=2)
    with Image.open(out) as im:
        mode, pixels = im.mode, np.asarray(im)
    plain_w, plain_h = 3 * (4 + 2) + 2, 2 * (4 + 2) + 2
    assert mode == "RGB" and pixels.shape[0] == 2 * plain_h and pixels.shape[1] > 2 * plain_w
    margin = pixels[:, : pixels.shape[1] - 2 * plain_w]
    top, bottom = margin[: pixels.shape[0] // 2], margin[pixels.shape[0] // 2:]
    assert (top < 128).any() and (bottom < 128).any()  # each row has its label
    assert (bottom < 128).sum() > (top < 128).sum()  # the longer label takes more ink
    assert pixels[2 * 2 + 1, margin.shape[1] + 2 * 2 + 1].tolist() == [0, 0, 0]  # the first image, enlarged


def test_slerp_hits_the_endpoints_and_stays_on_the_sphere():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 16, generator=g), torch.randn(3, 16, generator=g)
    torch.testing.assert_close(slerp(a, b, 0.0), a)
    torch.testing.assert_close(slerp(a, b, 1.0), b)
    u, v = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    torch.testing.assert_close(slerp(u, v, 0.5), torch.tensor([[0.5 ** 0.5, 0.5 ** 0.5]]))
    path = slerp(u.expand(5, -1), v.expand(5, -1), torch.linspace(0, 1, 5))
    torch.testing.assert_close(path.norm(dim=1), torch.ones(5))
    torch.testing.assert_close(slerp(u, u * 2, 0.5), u * 1.5)  # parallel: linear


def test_cli_renders_class_grid_and_interpolation_sheet_from_a_checkpoint(tmp_path, capsys):
    ckpt = write_tiny_checkpoint(tmp_path / "g_ema.pt")
    out = tmp_path / "out" / "grid.png"
    argv = [str(ckpt), "--classes", "0,3,coat", "--per-class", "4", "--truncation", "1.0", "--seed", "3",
            "--interp", "5", "--out", str(out), "--device", "cpu"]
    assert sample.main(argv) == 0
    mode, size, first = png(out)
    assert mode == "RGB" and size == (4 * 34 + 2, 3 * 34 + 2)
    mode, size, _ = png(tmp_path / "out" / "grid_interp.png")
    assert size == (5 * 34 + 2, 3 * 34 + 2)
    printed = capsys.readouterr().out
    assert "0:tshirt, 3:dress, 4:coat" in printed
    # same seed, same pixels; a different seed changes them
    assert sample.main(argv) == 0
    assert np.array_equal(png(out)[2], first)
    assert sample.main([*argv[:-4], "--seed", "4", "--out", str(out)]) == 0
    assert not np.array_equal(png(out)[2], first)


def test_module_entry_point_accepts_a_folder_and_standing_stats_and_rejects_unknown_classes(tmp_path):
    (tmp_path / "ckpt").mkdir()
    write_tiny_checkpoint(tmp_path / "ckpt" / "g_ema.pt")
    out = tmp_path / "g.png"
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.sample", "--checkpoint", str(tmp_path / "ckpt"), "--per-class", "2",
         "--standing-stats", "2", "--out", str(out), "--device", "cpu"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}" in done.stdout
    assert png(out)[1] == (2 * 34 + 2, 5 * 34 + 2)  # default: every class (up to 10)
    with pytest.raises(SystemExit):
        sample.main([str(tmp_path / "ckpt"), "--classes", "sandal", "--out", str(out)])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sample.main([str(tmp_path / "missing.pt"), "--out", str(out)])


def test_loaded_generator_matches_the_saved_weights(tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path / "g.pt", seed=5)
    G, cfg, names = load_generator(ckpt)
    assert names == NAMES and cfg.model.g_ch == 4 and not G.training and G.dim_z == 32
    state = torch.load(ckpt, weights_only=True)["g_ema_state"]
    for key, value in G.state_dict().items():
        assert torch.equal(value, state[key]), key
    images = class_grid(G, [1, 2], 3, dim_z=32, seed=0)
    assert images.shape == (6, 3, 32, 32) and images.abs().max() <= 1


@pytest.mark.parametrize("arch", ["biggan", "biggan-deep"])
def test_a_checkpoint_of_the_paper_attention_default_loads_back_into_the_same_generator(tmp_path, arch):
    """model.attention None means the paper's placement (64 px) for the trainer and for every checkpoint reader:
    the GPU check's 128 px checkpoint once failed to load ('Unexpected key(s) ... blocks.3.1.gamma')."""
    from pipeline.trainer import build_models

    cfg = tiny_config()
    cfg.model.arch, cfg.model.resolution, cfg.model.attention, cfg.model.dim_z = arch, 64, None, 40
    torch.manual_seed(0)
    G = build_models(cfg)[0]
    assert any(name.endswith(".gamma") for name in G.state_dict())  # the attention block is there to load
    path = tmp_path / "g.pt"
    torch.save({"g_ema_state": G.state_dict(), "config": cfg.to_dict(), "class_names": NAMES, "step": 1}, path)
    loaded, _, _ = load_generator(path)
    assert loaded.state_dict().keys() == G.state_dict().keys()
    assert all(torch.equal(v, G.state_dict()[k]) for k, v in loaded.state_dict().items())
