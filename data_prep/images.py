"""One image in, one training JPEG out: decode and check fully, convert to RGB, crop and resize, encode.

Every failure is an `ImageRejected` with a reason a person can act on; nothing here lets a bad file through
to a shard, because a corrupt JPEG stops a DALI pipeline for good.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never half an image

_BACKGROUND = (255, 255, 255)  # what transparent pixels become


class ImageRejected(ValueError):
    """The input is not a usable image; str(e) is the reason."""


def decode(data: bytes, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Fully decode `data` into an RGB image with EXIF orientation applied.

    `draft_size` lets the JPEG decoder scale down by 1/2..1/8 in the DCT while keeping at least that size
    (width, height, in the file's stored orientation): large photos decode several times faster with no
    visible cost.
    """
    if not data:
        raise ImageRejected("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:
                probe.verify()  # structure and checksums (PNG CRCs); does not decode pixels
            img = Image.open(io.BytesIO(data))
            if draft_size is not None and img.format == "JPEG":
                img.draft(img.mode, draft_size)
            img.load()  # decodes every pixel: truncated or corrupt data raises here
            img = ImageOps.exif_transpose(img)
            return to_rgb(img)
    except ImageRejected:
        raise
    except Image.UnidentifiedImageError:
        raise ImageRejected("not an image (format not recognised)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageRejected(f"too large: {e}") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types (OSError, SyntaxError, struct.error, ...)
        raise ImageRejected(f"corrupt or truncated: {type(e).__name__}: {e}") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: 16/32-bit greyscale scaled (not clipped), alpha composited on white."""
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img).astype(np.float64)
        hi = 65535.0 if mode != "I" or arr.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(np.rint(arr * (255.0 / hi)), 0, 255).astype(np.uint8), "L")
    elif mode == "F":
        arr = np.asarray(img).astype(np.float64)
        scale = 255.0 if arr.max(initial=0) <= 1.0 else 1.0
        img = Image.fromarray(np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8), "L")
    elif mode == "1":
        img = img.convert("L")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*_BACKGROUND, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")  # L, P, CMYK, YCbCr, LAB, HSV


def output_size(w: int, h: int, resolution: int, max_side: int | None) -> tuple[int, int]:
    """Size written to the shard: R x R (center crop), or aspect kept within [R.., max_side] (random crop)."""
    if max_side is None:
        return resolution, resolution
    scale = min(1.0, max_side / max(w, h))
    if min(w, h) * scale < resolution:  # keep the short side >= R where the source allows it
        scale = min(1.0, resolution / min(w, h))
    ow, oh = max(1, round(w * scale)), max(1, round(h * scale))
    return min(ow, max_side), min(oh, max_side)  # an extreme aspect ratio loses the ends of its long side


def crop_resize(img: Image.Image, resolution: int, max_side: int | None = None) -> Image.Image:
    """Center-crop to a square and resize to R (LANCZOS after an integer box reduction), or fit `max_side`."""
    w, h = img.size
    if max_side is None:
        side = min(w, h)
        box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
        size = (resolution, resolution)
    else:
        ow, oh = output_size(w, h, resolution, max_side)
        scale = max(ow / w, oh / h)  # the long side may be cropped to max_side, never squashed
        cw, ch = min(w, ow / scale), min(h, oh / scale)
        box = ((w - cw) / 2, (h - ch) / 2, (w + cw) / 2, (h + ch) / 2)
        size = (ow, oh)
    if size == (w, h) and box == (0, 0, w, h):
        return img
    return img.resize(size, Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)


def encode_jpeg(img: Image.Image, quality: int) -> bytes:
    out = io.BytesIO()
    # 4:4:4 chroma at high quality: small images lose visible colour detail to 4:2:0
    img.save(out, "JPEG", quality=quality, subsampling=0 if quality >= 90 else 2, optimize=True)
    return out.getvalue()


def process_bytes(data: bytes, resolution: int, quality: int = 95, max_side: int | None = None) -> bytes:
    """A file's bytes to the JPEG a shard stores; raises ImageRejected."""
    draft = None
    try:
        with Image.open(io.BytesIO(data)) as header:  # reads the header only
            ow, oh = output_size(*header.size, resolution, max_side)
            draft = (2 * ow, 2 * oh)
    except Exception:  # noqa: BLE001 - decode() below says what is wrong with the file
        pass
    return encode_jpeg(crop_resize(decode(data, draft), resolution, max_side), quality)


def process_array(pixels: np.ndarray, resolution: int, quality: int = 95, max_side: int | None = None) -> bytes:
    """A uint8 (H, W) or (H, W, 3) array (the built-in sources) to a shard JPEG."""
    arr = np.asarray(pixels)
    if arr.dtype != np.uint8:
        raise ImageRejected(f"expected uint8 pixels, got {arr.dtype}")
    if arr.ndim == 2:
        img = Image.fromarray(arr, "L")
    elif arr.ndim == 3 and arr.shape[2] == 3:
        img = Image.fromarray(arr, "RGB")
    else:
        raise ImageRejected(f"expected (H, W) or (H, W, 3) pixels, got shape {arr.shape}")
    return encode_jpeg(crop_resize(to_rgb(img), resolution, max_side), quality)
