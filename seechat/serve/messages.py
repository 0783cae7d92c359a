"""OpenAI messages -> the engine's messages and images, with every image source checked.

The marker rule: each image part of a user message becomes an `<image>` marker where the part stands,
and the message's parts are joined with newlines (so [image, text] is "<image>\\ntext", as the engine
itself attaches an image). Images of earlier turns stay in the conversation, in order. System and
assistant messages are text only; "developer" is taken as "system".

Image sources, in the order they are checked:
- `data:image/...;base64,...`: decoded here; over the size limit -> 413, bad base64 -> 400.
- `file://` URLs: only under the server's image folder (--image-dir): the file is opened once and the
  opened file's real path is checked (a link leading out of the folder is refused, and no swap between a
  check and the read can change which file is read).
- `http(s)://` URLs: refused unless remote images are allowed (--allow-remote-images); then fetched by
  `fetch.fetch` (no redirects, no private addresses, one deadline, the same size limit).
Then `load_image` decodes the bytes toward the size the vision expert needs, under the request's budget of
decoded pixels: not an image, truncated, a decompression bomb or over the budget -> ImageError.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..data.images import MAX_PIXELS, PixelBudget, load_image
from ..data.processor import IMAGE, IMAGE_MARKER, content
from .fetch import FetchRefused, fetch
from .protocol import APIError, ImagePart, Message, checked_text

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass
class ImagePolicy:
    """Which images a request may bring, and how large."""

    max_image_bytes: int = 20 * 2**20
    max_images: int = 8
    max_pixels: int = MAX_PIXELS
    image_dir: Path | None = None
    """file:// URLs are served from under this folder only; None refuses them."""
    allow_remote: bool = False
    allow_private: bool = False
    """Remote URLs may name loopback, private and link-local addresses (off: they are refused)."""
    remote_timeout: float = 10.0
    """Seconds for a whole remote fetch: connecting, headers and body."""
    max_decoded_pixels: int = 2 * MAX_PIXELS
    """Most pixels one request's images may decode to, all together."""
    min_side: int | None = None
    """Images are decoded toward this shorter side (what the vision expert resizes from); None: full size."""
    max_text_chars: int | None = None
    """Most characters of text in one request (None: no limit); the server sets 64 per token of context."""


def to_engine(messages: list[Message], policy: ImagePolicy) -> tuple[list[dict], list[Image.Image]]:
    """The engine's {'role', 'content'} messages (one <image> marker per image) and the decoded images.

    Limits are checked before any image is decoded: the number of images, then the amount of text."""
    parts = [(i, j, p) for i, m in enumerate(messages) if isinstance(m.content, list)
             for j, p in enumerate(m.content) if isinstance(p, ImagePart)]
    if len(parts) > policy.max_images:
        raise APIError(400, f"the request has {len(parts)} images, over this server's limit of {policy.max_images}: "
                            "send fewer images", param="messages", code="too_many_images")
    chars = sum(len(m.content) if isinstance(m.content, str) else
                sum(len(p.text) for p in m.content or [] if not isinstance(p, ImagePart)) for m in messages)
    if policy.max_text_chars is not None and chars > policy.max_text_chars:
        raise APIError(400, f"the messages hold {chars:,} characters of text, over this server's limit of "
                            f"{policy.max_text_chars:,}: shorten the conversation", param="messages",
                       code="context_length_exceeded")
    out, images = [], []
    budget = PixelBudget(policy.max_decoded_pixels)
    for i, m in enumerate(messages):
        role = ROLES[m.role]
        if m.content is None and role != "assistant":
            raise APIError(400, f"messages.{i}.content: a {m.role} message needs content", param=f"messages.{i}.content")
        pieces = [m.content or ""] if not isinstance(m.content, list) else m.content
        texts = []
        for j, part in enumerate(pieces):
            where = f"messages.{i}.content" + (f".{j}" if isinstance(m.content, list) else "")
            if isinstance(part, ImagePart):
                if role != "user":
                    raise APIError(400, f"{where}: images belong in user messages, not in a {m.role} message",
                                   param=where)
                images.append(load_image(read_image_url(part.url, policy, where), name=where,
                                         max_pixels=policy.max_pixels, min_side=policy.min_side, budget=budget))
                texts.append(IMAGE)
                continue
            text = checked_text(part if isinstance(part, str) else part.text, where)
            if IMAGE_MARKER in text:
                raise APIError(400, f"{where}: the text may not contain {IMAGE_MARKER!r}; send images as "
                                    "{'type': 'image_url'} content parts", param=where)
            texts.append(text)
        out.append({"role": role, "content": content(texts)})
    return out, images


def read_image_url(url: str, policy: ImagePolicy, where: str = "the image") -> bytes:
    """The bytes behind an image URL (data:, file:// or http(s)://), under the policy's limits."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return _data_url(url, policy, where)
    if scheme == "file":
        return _file_url(url, policy, where)
    if scheme in ("http", "https"):
        if not policy.allow_remote:
            raise APIError(400, f"{where}: remote image URLs are off on this server; send the image inline as a "
                                "data:image/...;base64 URL (or start the server with --allow-remote-images)",
                           param=where, code="remote_images_disabled")
        return _fetch(url, policy, where)
    raise APIError(400, f"{where}: image URLs must be data:image/...;base64, file:// or http(s):// URLs, "
                        f"got {url[:40]!r}", param=where, code="invalid_image_url")


def _too_large(size: int, policy: ImagePolicy, where: str) -> APIError:
    mb = policy.max_image_bytes / 2**20
    return APIError(413, f"{where}: the image is {size / 2**20:.1f} MB, over this server's limit of {mb:g} MB: "
                         "send a smaller image", param=where, code="image_too_large")


def _data_url(url: str, policy: ImagePolicy, where: str) -> bytes:
    head, sep, payload = url.partition(",")
    meta = head[len("data:"):].split(";")
    if not sep or "base64" not in meta[1:]:
        raise APIError(400, f"{where}: a data URL must look like data:image/png;base64,<base64 data>",
                       param=where, code="invalid_image_url")
    if meta[0] and not meta[0].lower().startswith("image/") and meta[0].lower() != "application/octet-stream":
        raise APIError(400, f"{where}: the data URL says {meta[0]!r}, not an image type", param=where,
                       code="invalid_image")
    if len(payload) * 3 // 4 > policy.max_image_bytes + 3:  # before decoding: base64 is 4 characters per 3 bytes
        raise _too_large(len(payload) * 3 // 4, policy, where)
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{where}: the data URL's payload is not valid base64", param=where,
                       code="invalid_base64") from None
    if len(data) > policy.max_image_bytes:
        raise _too_large(len(data), policy, where)
    if not data:
        raise APIError(400, f"{where}: the data URL is empty", param=where, code="invalid_image")
    return data


def _file_url(url: str, policy: ImagePolicy, where: str) -> bytes:
    if policy.image_dir is None:
        raise APIError(400, f"{where}: file:// image URLs are off on this server (start it with --image-dir DIR "
                            "to serve images from that folder)", param=where, code="file_urls_disabled")
    parsed = urllib.parse.urlsplit(url)
    if parsed.netloc not in ("", "localhost"):
        raise APIError(400, f"{where}: a file:// URL must name a local path (file:///path)", param=where,
                       code="invalid_image_url")
    root = policy.image_dir.resolve()
    path = Path(urllib.request.url2pathname(parsed.path))
    if not path.is_absolute():
        path = root / path
    outside = APIError(400, f"{where}: file:// URLs may only name files under the server's image folder",
                       param=where, code="file_url_outside_image_dir")
    missing = APIError(400, f"{where}: no such file in the server's image folder", param=where,
                       code="image_not_found")
    try:  # not even opened when the name alone leads out (so no device or FIFO outside is ever touched)
        if not Path(os.path.abspath(path)).is_relative_to(root):
            raise outside
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except (OSError, ValueError):
        raise missing from None
    try:
        info = os.fstat(fd)
        if not _opened_inside(fd, info, path, root):
            raise outside
        if not stat.S_ISREG(info.st_mode):
            raise missing
        if info.st_size > policy.max_image_bytes:
            raise _too_large(info.st_size, policy, where)
        with os.fdopen(os.dup(fd), "rb") as fh:
            data = fh.read(policy.max_image_bytes + 1)
    except OSError:
        raise APIError(400, f"{where}: the file cannot be read", param=where, code="image_not_found") from None
    finally:
        os.close(fd)
    if len(data) > policy.max_image_bytes:
        raise _too_large(len(data), policy, where)
    return data


def _opened_inside(fd: int, info: os.stat_result, path: Path, root: Path) -> bool:
    """Whether the file open at `fd` lies under `root`, links followed. Where the system names an open file's
    path (/proc/self/fd on Linux), that name is checked; elsewhere the resolved name must be the same file."""
    try:
        real = Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        try:
            real = path.resolve(strict=True)
            now = real.stat()
        except (OSError, RuntimeError):
            return False
        if (now.st_dev, now.st_ino) != (info.st_dev, info.st_ino):
            return False
    return real.is_relative_to(root)


def _fetch(url: str, policy: ImagePolicy, where: str) -> bytes:
    try:
        return fetch(url, max_bytes=policy.max_image_bytes, timeout=policy.remote_timeout,
                     allow_private=policy.allow_private)
    except FetchRefused as exc:
        raise APIError(exc.status, f"{where}: {exc}", param=where, code=exc.code) from None
