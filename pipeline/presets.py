"""Presets as code: each returns a whole RunConfig. They differ from the defaults only where the paper does."""

from __future__ import annotations

from collections.abc import Callable

from pipeline.config import ConfigError, RunConfig


def imagenet128() -> RunConfig:
    """BigGAN at 128 px as in Brock et al. 2019 (batch 2048, ch 96, G 5e-5 / D 2e-4, Adam(0, 0.999), D:G 2:1)."""
    cfg = RunConfig(preset="imagenet128")
    cfg.model.arch, cfg.model.resolution, cfg.model.num_classes = "biggan", 128, 1000
    # the paper halves SAGAN's rates and takes 2 D steps per G step (as StudioGAN's BigGAN-2048 configs)
    cfg.optim.g_lr, cfg.optim.d_lr, cfg.optim.beta1, cfg.optim.beta2, cfg.optim.eps = 5e-5, 2e-4, 0.0, 0.999, 1e-6
    cfg.loss.d_steps = 2
    # center crops, as the references train and as FID's reference statistics are taken
    cfg.data.batch_size, cfg.data.random_crop = 256, False
    cfg.model.cross_replica_bn = True  # the paper's G normalizes over all replicas; imagenet256/512/128-deep inherit it
    cfg.cluster.num_workers, cfg.cluster.use_gpu, cfg.cluster.cpus_per_worker = 8, True, 8
    cfg.eval.every = 2000
    return cfg


def imagenet128_biggan_pytorch() -> RunConfig:
    """BigGAN at 128 px with ajbrock/BigGAN-PyTorch's launch-script recipe: G 1e-4 / D 4e-4, 1 D step per G step."""
    cfg = imagenet128()
    cfg.preset = "imagenet128-biggan-pytorch"
    cfg.optim.g_lr, cfg.optim.d_lr = 1e-4, 4e-4
    cfg.loss.d_steps = 1
    return cfg


def imagenet128_deep() -> RunConfig:
    """BigGAN-deep at 128 px (ch 128, two blocks per resolution, z 128)."""
    cfg = imagenet128()
    cfg.preset = "imagenet128-deep"
    cfg.model.arch = "biggan-deep"
    return cfg


def imagenet256() -> RunConfig:
    cfg = imagenet128()
    cfg.preset = "imagenet256"
    cfg.model.resolution = 256
    cfg.data.batch_size = 128
    cfg.cluster.num_workers = 16
    return cfg


def imagenet512() -> RunConfig:
    cfg = imagenet128()
    cfg.preset = "imagenet512"
    cfg.model.resolution = 512
    cfg.data.batch_size = 64
    cfg.cluster.num_workers = 32
    return cfg


def demo() -> RunConfig:
    """The embedded default: a small class-conditional BigGAN on Fashion-MNIST, 2 CPU workers, minutes."""
    cfg = RunConfig(preset="demo")
    cfg.model.arch, cfg.model.resolution = "biggan", 32
    cfg.model.g_ch, cfg.model.d_ch, cfg.model.dim_z, cfg.model.shared_dim = 16, 16, 32, 32
    cfg.model.attention = 0
    cfg.data.batch_size, cfg.data.num_threads = 32, 1
    # 4x the SAGAN rates with translation DiffAugment: in the same 450 steps FID 32.9 -> 15.4 and the CAS gap
    # 28 -> 17 points (bench/RESULTS.md, "Session 8"); without it the same rates raised a health alarm at step 215
    cfg.optim.g_lr, cfg.optim.d_lr = 8e-4, 8e-4
    cfg.data.diffaug = "translation"
    # MSGAN's mode-seeking term at half weight: over two seeds FID 12.2 / 17.6 -> 10.0 / 10.5, recall 0.34 / 0.28 ->
    # 0.85 / 0.77 and the CAS gap 15.3 / 16.8 -> 12.4 / 13.4 points; weight 1 doubled the gap's spread, 2 hurt
    # (bench/RESULTS.md, "Session 11")
    cfg.loss.mode_seeking = 0.5
    # an AC-GAN classifier beside D's projection: one rank, two seeds, FID 10.0 / 10.5 -> 7.9 / 7.3 and the CAS gap
    # 12.4 / 13.4 -> 10.4 / 10.4 points; in the two-worker demo FID 14.5 -> 8.5, the gap unchanged (13.3); the
    # classifier instead of the projection: FID 11.1, gap 16.3 (bench/RESULTS.md, "Session 12")
    cfg.model.d_head, cfg.loss.acgan_weight = "projection+acgan", 1.0
    # Fashion-MNIST's shoes and bags all face one way: mirroring half the training images taught G mirrored shoes
    # that the test images never have. Off, in the two-worker demo: FID 8.49 -> 0.84, the CAS gap 13.25 -> 11.65
    # points, the real classifier's accuracy on samples 0.84 -> 0.94 (bench/RESULTS.md, "Session 14")
    cfg.data.flip = False
    cfg.optim.zero_stage = 0
    cfg.ema.decay, cfg.ema.start_step = 0.99, 100  # a short run: average the last ~100 steps, not ~1000
    # 1,000 steps: in one two-worker run the CAS gap was 11.3 points at step 450, 8.0 at 600, 6.3 at 800 and 4.9 at
    # 1,000 (bench/RESULTS.md, "Session 20"). Aimed at 10 minutes on 2 cores after installation: on the AMX Xeon the
    # issue measured on, steps take ~0.37 s; on CPUs without native bf16 about three times that (13.7-14.4 min at 450
    # steps on a Xeon without AMX, "Session 16", "Session 19"), where --set train.steps=450 halves the wait
    cfg.train.steps, cfg.train.global_batch = 1000, 64
    cfg.train.log_every, cfg.train.sample_every, cfg.train.checkpoint_every = 25, 250, 250
    cfg.cluster.num_workers, cfg.cluster.use_gpu, cfg.cluster.max_failures = 2, False, 1
    # health checks every 10 G steps, the default: every 5 cost 28 s of a fresh demo (bench/RESULTS.md, "Session 22")
    cfg.health.every, cfg.health.min_history = 10, 10
    # a run worth reviewing: FID and CAS in the dataset classifier's features at the end, the checkpoint registered
    # (eval.register_model), a truncation sweep; 4 standing-statistics passes of 250 samples are enough for G's
    # batch norms at this size and cost a fifth of the default 16
    e = cfg.eval
    e.every, e.features, e.num_samples, e.reference_images, e.batch_size = 1000, "classifier", 5000, 5000, 250
    e.classifier_epochs, e.pr_samples, e.cas_samples, e.cas_test_images = 5, 2000, 5000, 2000
    e.truncation_sweep, e.standing_stats_passes = "0.5,1.0,0", 4
    return cfg


def _classic_baseline(preset: str) -> RunConfig:
    """The demo's data, budget and cluster for a classic GAN, which trains as published: without DiffAugment, the
    mode-seeking term or the AC-GAN classifier, with mirrored images (as measured in bench/RESULTS.md)."""
    cfg = demo()
    cfg.preset = preset
    cfg.data.diffaug, cfg.loss.mode_seeking, cfg.model.d_head, cfg.data.flip = "", 0.0, "projection", True
    return cfg


def dcgan_fmnist() -> RunConfig:
    """The DCGAN baseline (Radford et al. 2016) on Fashion-MNIST at 32 px, non-saturating loss, on the demo's cluster."""
    cfg = _classic_baseline("dcgan-fmnist")
    cfg.model.arch, cfg.model.g_ch, cfg.model.d_ch, cfg.model.dim_z = "dcgan", 32, 32, 100
    cfg.model.d_norm, cfg.model.d_conditioning = "batch", "projection"
    cfg.loss.kind, cfg.loss.d_steps, cfg.loss.ortho_beta = "bce", 1, 0.0
    cfg.optim.g_lr, cfg.optim.d_lr, cfg.optim.beta1, cfg.optim.beta2, cfg.optim.eps = 2e-4, 2e-4, 0.5, 0.999, 1e-8
    cfg.health.d_loss_floor = 0.001  # a BCE D often wins for a while; only a D at ~0 loss is suspicious
    return cfg


def wgan_gp_fmnist() -> RunConfig:
    """WGAN-GP (Gulrajani et al. 2017) on Fashion-MNIST at 32 px: 5 critic steps, LayerNorm critic, lambda 10."""
    cfg = _classic_baseline("wgan-gp-fmnist")
    cfg.model.arch, cfg.model.g_ch, cfg.model.d_ch, cfg.model.dim_z = "dcgan", 32, 32, 100
    cfg.model.d_norm, cfg.model.d_conditioning = "layer", "projection"
    cfg.loss.kind, cfg.loss.d_steps, cfg.loss.gp_lambda, cfg.loss.ortho_beta = "wgan-gp", 5, 10.0, 0.0
    cfg.optim.g_lr, cfg.optim.d_lr, cfg.optim.beta1, cfg.optim.beta2, cfg.optim.eps = 1e-4, 1e-4, 0.0, 0.9, 1e-8
    return cfg


PRESETS: dict[str, Callable[[], RunConfig]] = {
    "imagenet128": imagenet128,
    "imagenet128-biggan-pytorch": imagenet128_biggan_pytorch,
    "imagenet128-deep": imagenet128_deep,
    "imagenet256": imagenet256,
    "imagenet512": imagenet512,
    "demo": demo,
    "dcgan-fmnist": dcgan_fmnist,
    "wgan-gp-fmnist": wgan_gp_fmnist,
}


def get_preset(name: str) -> RunConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
