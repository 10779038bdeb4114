"""Decoders that turn a batch of JPEG bytes plus augmentation draws into (images, labels) tensors.

Both apply the same geometry: a square crop of side `crop_frac * short side` placed at (crop_x, crop_y) of
the free range, resized to R x R (bilinear, antialiased), mirrored where `flip` is 1, then scaled to [-1, 1].
Without random crop the square is the center one, which leaves R x R shard images untouched.
"""

from __future__ import annotations

import io
import queue
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFile

from pipeline.data.schedule import AugParams

ImageFile.LOAD_TRUNCATED_IMAGES = False


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


def crop_box(w: int, h: int, frac: float, cx: float, cy: float) -> tuple[int, int, int, int]:
    """Whole-pixel square crop, computed as DALI computes crop_w / crop_pos_x (float32, side truncated,
    anchor rounded half up), so the PIL and DALI backends cut the same pixels."""
    side = max(1, min(w, h, int(np.float32(min(w, h)) * np.float32(frac))))
    left = int(np.floor(np.float32(cx) * np.float32(w - side) + 0.5))
    top = int(np.floor(np.float32(cy) * np.float32(h - side) + 0.5))
    return left, top, left + side, top + side


def decode_pil(data: bytes, resolution: int, frac: float, cx: float, cy: float, flip: int) -> np.ndarray:
    """One JPEG to a uint8 (R, R, 3) array; raises on anything PIL cannot decode in full."""
    img = Image.open(io.BytesIO(data))
    if img.format == "JPEG":
        scale = 2 * resolution / (min(img.size) * float(frac))
        if scale <= 0.5:  # let the JPEG decoder scale down in the DCT first (large inputs only)
            img.draft("RGB", (int(np.ceil(img.size[0] * scale)), int(np.ceil(img.size[1] * scale))))
    img = img.convert("RGB")  # loads every pixel
    w, h = img.size
    box = crop_box(w, h, frac, cx, cy)
    if (w, h) != (resolution, resolution) or box != (0, 0, w, h):
        img = img.resize((resolution, resolution), Image.Resampling.BILINEAR, box=box)
    arr = np.asarray(img)
    return arr[:, ::-1] if flip else arr


def to_unit_range(images_u8_nhwc: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 NHWC (any device) -> float32 NCHW in [-1, 1] on `device`."""
    x = images_u8_nhwc.to(device, non_blocking=True).permute(0, 3, 1, 2)
    return x.float().div_(127.5).sub_(1.0).contiguous()


class PilDecoder:
    """The "wds" backend: PIL in a thread pool (PIL releases the GIL while decoding)."""

    name = "wds"

    def __init__(self, resolution: int, num_threads: int, pin_memory: bool):
        self.resolution = resolution
        self.pool = ThreadPoolExecutor(max(1, num_threads), thread_name_prefix="pil-decode")
        self.pin_memory = pin_memory

    def decode(self, jpgs: list[bytes], aug: AugParams) -> tuple[torch.Tensor | None, list[str | None]]:
        """uint8 NHWC tensor with failed slots zero, and per-sample error (None where it decoded)."""
        r = self.resolution

        def one(i: int):
            try:
                return decode_pil(jpgs[i], r, aug.crop_frac[i], aug.crop_x[i], aug.crop_y[i], aug.flip[i]), None
            except Exception as e:  # noqa: BLE001 - any decoder failure marks the sample bad
                return None, f"{type(e).__name__}: {e}"

        results = list(self.pool.map(one, range(len(jpgs))))
        out = np.zeros((len(jpgs), r, r, 3), np.uint8)
        errors: list[str | None] = []
        for i, (arr, err) in enumerate(results):
            if arr is not None:
                out[i] = arr
            errors.append(err)
        t = torch.from_numpy(out)
        return (t.pin_memory() if self.pin_memory else t), errors

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class DaliDecoder:
    """The "dali-cpu" / "dali-gpu" backends: a DALI pipeline fed by an external source.

    The samples and augmentation draws come from the shared schedule (the same as every backend); DALI only
    decodes, crops, resizes, mirrors and normalizes, on the CPU (device_id=None) or with nvJPEG ("mixed").
    """

    def __init__(self, resolution: int, batch_size: int, num_threads: int, device: torch.device,
                 source: Callable[[], tuple], gpu: bool):
        from nvidia.dali import fn, pipeline_def, types  # noqa: PLC0415
        from nvidia.dali.math import min as dali_min  # noqa: PLC0415
        from nvidia.dali.plugin.pytorch import DALIGenericIterator  # noqa: PLC0415

        self.name = "dali-gpu" if gpu else "dali-cpu"
        self.device = device
        if gpu:
            if device.type != "cuda":
                raise ValueError("backend dali-gpu needs a CUDA device")
            device_id = device.index if device.index is not None else torch.cuda.current_device()
        else:
            device_id = None  # a CPU-only pipeline

        @pipeline_def(batch_size=batch_size, num_threads=max(1, num_threads), device_id=device_id,
                      prefetch_queue_depth=2, seed=0)
        def pipe():
            jpegs, frac, cx, cy, flip, labels = fn.external_source(
                source=source, num_outputs=6, batch=True,
                dtype=[types.UINT8, types.FLOAT, types.FLOAT, types.FLOAT, types.INT32, types.INT64],
            )
            shape = fn.peek_image_shape(jpegs)  # H, W, C from the header
            short = fn.cast(dali_min(shape[0], shape[1]), dtype=types.FLOAT)
            side = short * frac
            images = fn.decoders.image_crop(
                jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB,
                crop_w=side, crop_h=side, crop_pos_x=cx, crop_pos_y=cy,
            )
            images = fn.resize(images, size=[resolution, resolution], interp_type=types.INTERP_LINEAR,
                               antialias=True)
            images = fn.crop_mirror_normalize(images, mirror=flip, mean=[127.5] * 3, std=[127.5] * 3,
                                              dtype=types.FLOAT, output_layout="CHW")
            return images, labels

        self.pipe = pipe()
        self.pipe.build()
        self.iter = DALIGenericIterator(self.pipe, ["images", "labels"], size=-1, auto_reset=False,
                                        prepare_first_batch=False)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        out = next(self.iter)[0]
        images, labels = out["images"], out["labels"].reshape(-1).long()
        if images.device != self.device:
            images = images.to(self.device, non_blocking=True)
        return images, labels.to(self.device, non_blocking=True)

    def close(self) -> None:
        self.iter = None
        self.pipe = None


class QueueSource:
    """The external source callback: pops prepared raw batches from the producer's queue, in order."""

    def __init__(self, q: queue.Queue, on_batch: Callable[[Any], tuple]):
        self.q, self.on_batch = q, on_batch

    def __call__(self) -> tuple:
        item = self.q.get()
        if isinstance(item, BaseException):
            raise item
        return self.on_batch(item)
