"""Reading images safely: every failure becomes an ImageError that names the file and what to do."""

from __future__ import annotations

import io
import os
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..errors import ImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MAX_PIXELS = 64_000_000
"""Larger images are refused (a decompression bomb guard; 64 MP is an 8000x8000 photo)."""


class PixelBudget:
    """Decoded pixels one caller (one request) may still spend; `load_image` takes from it before decoding.

    Counts the pixels an image decodes to (after JPEG's `draft` shrink), so a request of many large PNGs is
    refused once their sum passes the budget, before the next one is decoded."""

    def __init__(self, pixels: int):
        self.left = pixels
        self.total = pixels

    def take(self, pixels: int, label: str) -> None:
        if pixels > self.left:
            raise ImageError(f"image {label} would decode to {pixels:,} pixels, over what is left of this request's "
                             f"budget of {self.total:,} decoded pixels: send fewer or smaller images")
        self.left -= pixels


class DecodeGate:
    """Bounds the pixels being decoded at once in this process (full-size buffers are the memory peak).

    A decode waits while others hold more than `pixels` in flight; one alone always proceeds."""

    def __init__(self, pixels: int):
        self.pixels = pixels
        self._in_flight = 0
        self._cond = threading.Condition()

    @contextmanager
    def hold(self, pixels: int):
        with self._cond:
            self._cond.wait_for(lambda: self._in_flight == 0 or self._in_flight + pixels <= self.pixels)
            self._in_flight += pixels
        try:
            yield
        finally:
            with self._cond:
                self._in_flight -= pixels
                self._cond.notify_all()


DECODE_GATE = DecodeGate(2 * MAX_PIXELS)
"""At most about two of the largest allowed images are decoded at full size at once, process-wide."""


def load_image(
    source: str | os.PathLike | bytes, *, name: str | None = None, max_pixels: int = MAX_PIXELS,
    min_side: int | None = None, budget: PixelBudget | None = None,
) -> Image.Image:
    """Open a file path or raw bytes as an RGB PIL image, fully decoded.

    With `min_side`, the image is decoded straight toward that size: JPEGs through `draft` (the decoder
    scales by 1/2, 1/4, 1/8), then `reduce` by a whole factor and a thumbnail before the colour conversion,
    keeping the shorter side at least `min_side` (what the vision expert's processor resizes from). With
    `budget`, the decoded pixels are taken from it first. Full-size decodes take turns through DECODE_GATE.

    Raises ImageError for a missing file, bytes that are not an image, a truncated or corrupt image,
    one with more than `max_pixels` pixels, or one over the budget.
    """
    label = name or (f"'{source}'" if not isinstance(source, bytes) else "the image")
    if isinstance(source, bytes):
        fh = io.BytesIO(source)
    else:
        path = Path(source)
        if not path.exists():
            raise ImageError(f"image {label} does not exist: check the path")
        if path.is_dir():
            raise ImageError(f"image {label} is a directory: give an image file")
        fh = path
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fh) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise ImageError(
                        f"image {label} is {width}x{height} pixels, over the limit of {max_pixels:,}: resize it first"
                    )
                if min_side and img.format == "JPEG":
                    scale = max(1, min(width, height) // min_side)
                    img.draft("RGB", (max(1, width // scale), max(1, height // scale)))
                pixels = img.size[0] * img.size[1]
                if budget is not None:
                    budget.take(pixels, label)
                with DECODE_GATE.hold(pixels):
                    img.load()
                    return _shrunk(img, min_side).convert("RGB")
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"image {label} is too large to decode safely ({exc}): resize it first") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(f"{label} is not an image file PIL can read: give a JPEG, PNG, WebP, BMP, GIF or TIFF") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"image {label} is corrupt or truncated ({exc}): re-download or re-export it") from exc


def _shrunk(img: Image.Image, min_side: int | None) -> Image.Image:
    """`img` made smaller, its shorter side kept >= min_side: a whole-factor `reduce` (box average, cheap),
    then a thumbnail down to at most twice min_side. Modes `reduce` cannot handle (palette, 1-bit) go to RGB(A)
    first; the result is the same picture at the smaller size."""
    if not min_side or min(img.size) < 2 * min_side:
        return img
    if img.mode not in ("L", "LA", "RGB", "RGBA", "RGBX", "CMYK"):
        img = img.convert("RGBA" if img.has_transparency_data else "RGB")
    factor = min(img.size) // min_side // 2
    if factor >= 2:
        img = img.reduce(factor)
    if min(img.size) >= 2 * min_side:
        scale = 2 * min_side / min(img.size)
        img.thumbnail((max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale))),
                      Image.Resampling.BICUBIC)
    return img


def needed_side(image_processor) -> int | None:
    """The shorter side, in pixels, an image needs for this Hugging Face image processor (None: unknown):
    the largest of its size and crop size entries (a dict or transformers' SizeDict), so never too small."""
    sides = []
    for key in ("size", "crop_size"):
        value = getattr(image_processor, key, None)
        if isinstance(value, int):
            sides.append(value)
            continue
        for entry in ("shortest_edge", "longest_edge", "height", "width"):
            side = value.get(entry) if isinstance(value, dict) else getattr(value, entry, None)
            if isinstance(side, int):
                sides.append(side)
    return max(sides) if sides else None


def list_images(directory: str | os.PathLike) -> list[Path]:
    """Image files of a directory (by suffix), sorted by name."""
    return sorted(p for p in Path(directory).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
