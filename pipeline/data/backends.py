"""Decoders that turn a batch of JPEG bytes plus augmentation draws into (images, labels) tensors.

Both apply the same geometry: a square crop of side `crop_frac * short side` placed at (crop_x, crop_y) of
the free range, resized to R x R (bilinear, antialiased), mirrored where `flip` is 1, then scaled to [-1, 1].
Without random crop the square is the center one, which leaves R x R shard images untouched.
"""

from __future__ import annotations

import io
from collections import deque
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

    DALI has no option to skip a sample it cannot decode: the whole iteration fails. So every raw batch
    handed to the pipeline is kept (`pending`, in order) until its output comes back, tagged with a serial
    number that travels through the pipeline and is checked on return. When an iteration fails, `next`
    returns (None, None, raw batch, error) and the pipeline is rebuilt, the batches it had already pulled
    to be replayed first (the caller may put a repaired batch in front of them, see loader.py): nothing is
    lost or reordered, whatever DALI's executor does after an error. Cost: nothing per batch; per
    failure, one build (40-50 ms on CPU) plus what the caller does.
    """

    def __init__(self, resolution: int, batch_size: int, num_threads: int, device: torch.device, gpu: bool):
        self.name = "dali-gpu" if gpu else "dali-cpu"
        self.device, self.gpu = device, gpu
        self.resolution, self.batch_size, self.num_threads = resolution, batch_size, max(1, num_threads)
        if gpu:
            if device.type != "cuda":
                raise ValueError("backend dali-gpu needs a CUDA device")
            self.device_id = device.index if device.index is not None else torch.cuda.current_device()
        else:
            self.device_id = None  # a CPU-only pipeline
        self.pending: deque = deque()  # raw batches pulled by the pipeline, output not returned yet
        self.replay: deque = deque()  # pulled by a pipeline that failed: fed again, first
        self.next_raw: Callable[[], Any] | None = None
        self.to_inputs: Callable[[Any], tuple] | None = None
        self.source_error: BaseException | None = None
        self.rebuilds = 0
        self._build()

    def attach(self, next_raw: Callable[[], Any], to_inputs: Callable[[Any], tuple]) -> None:
        """Where raw batches come from from now on; forgets what an earlier source had handed over."""
        if self.pending or self.replay:
            self.pending.clear()
            self.replay.clear()
            self._build()
        self.next_raw, self.to_inputs, self.source_error = next_raw, to_inputs, None

    def _source(self) -> tuple:
        if self.replay:
            raw = self.replay.popleft()
        else:
            try:
                raw = self.next_raw()
            except BaseException as e:  # the reader's own failure: `next` re-raises it as it is
                self.source_error = e
                raise
        self.pending.append(raw)
        return self.to_inputs(raw)

    def _build(self) -> None:
        from nvidia.dali import fn, pipeline_def, types  # noqa: PLC0415
        from nvidia.dali.math import min as dali_min  # noqa: PLC0415
        from nvidia.dali.plugin.pytorch import DALIGenericIterator  # noqa: PLC0415

        gpu, resolution = self.gpu, self.resolution
        self.iter = self.pipe = None

        @pipeline_def(batch_size=self.batch_size, num_threads=self.num_threads, device_id=self.device_id,
                      prefetch_queue_depth=2, seed=0)
        def pipe():
            jpegs, frac, cx, cy, flip, labels, serial = fn.external_source(
                source=self._source, num_outputs=7, batch=True,
                dtype=[types.UINT8, types.FLOAT, types.FLOAT, types.FLOAT, types.INT32, types.INT64, types.INT64],
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
            return images, labels, serial

        self.pipe = pipe()
        self.pipe.build()
        self.iter = DALIGenericIterator(self.pipe, ["images", "labels", "serial"], size=-1, auto_reset=False,
                                        prepare_first_batch=False)

    def next(self) -> tuple[torch.Tensor | None, torch.Tensor | None, Any, str | None]:
        """(images, labels, raw batch, None), or (None, None, raw batch, DALI's error) when DALI failed on it."""
        try:
            out = next(self.iter)[0]
        except Exception as e:
            if self.source_error is not None:
                raise self.source_error from None
            if not self.pending:
                raise
            raw = self.pending.popleft()
            self.replay = deque([*self.pending, *self.replay])
            self.pending.clear()
            self.rebuilds += 1
            self._build()
            return None, None, raw, " ".join(str(e).split())[:300]
        raw = self.pending.popleft()
        serial = int(out["serial"].reshape(-1)[0])
        if serial != raw.serial:  # would mean an output paired with the wrong batch: never hand that on
            raise RuntimeError(f"DALI returned batch {serial}, expected {raw.serial}")
        images, labels = out["images"], out["labels"].reshape(-1).long()
        if images.device != self.device:
            images = images.to(self.device, non_blocking=True)
        return images, labels.to(self.device, non_blocking=True), raw, None

    def close(self) -> None:
        self.iter = None
        self.pipe = None
        self.pending.clear()
        self.replay.clear()
