"""Reading images safely: every failure becomes an ImageError that names the file and what to do."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..errors import ImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MAX_PIXELS = 64_000_000
"""Larger images are refused (a decompression bomb guard; 64 MP is an 8000x8000 photo)."""


def load_image(source: str | os.PathLike | bytes, *, name: str | None = None, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open a file path or raw bytes as an RGB PIL image, fully decoded.

    Raises ImageError for a missing file, bytes that are not an image, a truncated or corrupt image,
    or one with more than `max_pixels` pixels.
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
                img.load()
                return img.convert("RGB")
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"image {label} is too large to decode safely ({exc}): resize it first") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(f"{label} is not an image file PIL can read: give a JPEG, PNG, WebP, BMP, GIF or TIFF") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"image {label} is corrupt or truncated ({exc}): re-download or re-export it") from exc


def list_images(directory: str | os.PathLike) -> list[Path]:
    """Image files of a directory (by suffix), sorted by name."""
    return sorted(p for p in Path(directory).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
