"""The frozen vision expert's features of the training images, computed once and read back (`speed.vision_features`).

    seechat train align --config FILE.yaml speed.vision_features=true
    # Stage II over the same images, the same vision expert: it reuses the store
    seechat train instruct --config FILE.yaml speed.vision_features=true speed.vision_features_dir=OUT/features

With the vision expert frozen, an image's features are the same every time it is seen, yet a training step
decodes, resizes and encodes every image of its batch again. Here every image that the indexed training data
names is encoded once, in large batches without gradients, and written to DIR (shards of safetensors and an
index); the data loader reads an image's features instead of its pixels and the bridge starts from them. It
pays where an image is seen more than once: several epochs, Stage I and Stage II over the same pictures, sweeps
over the bridge (the toy world v2's build: 23,000 image views in both stages, 10,000 pictures).

A CNN vision expert (seechat/model/cnn.py) also keeps features in memory, keyed by a hash of the pixels, for one
process; the store goes further: no decoding or resizing, and it lasts across stages and runs.

A store is keyed by a fingerprint of the vision expert (its weights, configuration, feature choice and image
processor): another expert, or a changed one, computes a new store; the same one (a resumed run, the next
stage) reuses it and encodes only images it lacks. An image is known by its path, size and modification time
(an image given as bytes: by its content's hash). An image that cannot be read is recorded as bad with the
reason, and every sample that uses it is skipped and counted, as without the store.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import ConfigError, ImageError, SeeChatError
from .datasets import open_image
from .sources import BadSample, IndexedSource

log = logging.getLogger("seechat")

INDEX = "index.json"
SHARD_IMAGES = 4096
"""Images per shard file (a shard is built in memory before it is written)."""


def image_key(image, root) -> str:
    """How the store knows an image: its resolved path, size and modification time (or bytes: their hash)."""
    if isinstance(image, bytes):
        return "bytes:" + hashlib.blake2b(image, digest_size=16).hexdigest()
    path = os.path.realpath(os.path.join(root, str(image)))
    try:
        st = os.stat(path)
    except OSError:
        return f"{path}|missing"
    return f"{path}|{st.st_size}|{st.st_mtime_ns}"


def fingerprint(model, autocast: torch.dtype | None = None) -> str:
    """What decides the features: the vision expert's weights and configuration, the feature choice, the image
    processor's settings and the training's autocast."""
    h = hashlib.blake2b(digest_size=16)
    h.update(str(autocast).encode())
    vision = model.vision
    choice = {k: v for k, v in vision.config.__dict__.items() if k != "name_or_path"}  # the weights say which
    h.update(json.dumps(choice, sort_keys=True, default=str).encode())
    for part in (getattr(vision.model, "config", None), model.processor.image_processor):
        h.update((part.to_json_string() if hasattr(part, "to_json_string") else repr(part)).encode())
    for name, t in [*vision.model.named_parameters(), *vision.model.named_buffers()]:  # BatchNorm's counters too
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class VisionFeatureStore:
    """Features by image key, read lazily from DIR's shards (each process opens the files it needs)."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        index = json.loads((self.dir / INDEX).read_text())
        self.fingerprint: str = index["fingerprint"]
        self.rows: dict[str, list[int]] = index["rows"]
        """key -> [shard, row]"""
        self.bad: dict[str, str] = index["bad"]
        """key -> why the image could not be read"""
        self.shards: list[str] = index["shards"]
        self._open: dict[int, object] = {}

    def __getstate__(self):  # dataloader workers open the files themselves
        return {**self.__dict__, "_open": {}}

    def __len__(self) -> int:
        return len(self.rows)

    def features(self, image, root) -> torch.Tensor:
        """The (tokens, hidden) features of one image; BadSample when it was unreadable or is not in the store."""
        key = image_key(image, root)
        if key in self.bad:
            raise BadSample(self.bad[key])
        where = self.rows.get(key)
        if where is None:
            name = "an image given as bytes" if isinstance(image, bytes) else f"'{image}'"
            raise BadSample(f"{name} is not in the vision feature store {self.dir} (changed since it was "
                            "computed?): run again to encode it, or set speed.vision_features false")
        shard, row = where
        try:
            return self._shard(shard).get_slice("features")[row]
        except Exception as exc:  # a shard removed or damaged during the run (safetensors' own error type too)
            raise BadSample(f"the vision feature store {self.dir} cannot be read ({exc.__class__.__name__}: "
                            f"{str(exc)[:120]}): delete it to have it computed anew") from exc

    def _shard(self, k: int):
        if k not in self._open:
            from safetensors import safe_open

            self._open[k] = safe_open(str(self.dir / self.shards[k]), framework="pt")
        return self._open[k]


def _images(sources: list[IndexedSource]) -> dict[str, tuple]:
    """Every image the records name, by key (unreadable records are left to the dataset to count)."""
    found: dict[str, tuple] = {}
    seen: set = set()  # (root, name) already keyed: pictures shared by many records are looked up once
    for part in sources:
        root = part.source.root
        for j in tqdm(range(len(part)), desc=f"vision features: reading {Path(part.source.path).name}",
                      unit="record", leave=False, mininterval=1.0):
            try:
                record = part.record(j)
            except BadSample:
                continue
            for image in record.images:
                if isinstance(image, bytes) or (root, image) not in seen:
                    found.setdefault(image_key(image, root), (image, root))
                if not isinstance(image, bytes):
                    seen.add((root, image))
    return found


def prepare(model, sources: list[IndexedSource], directory: str | os.PathLike, *, device: str = "cpu",
            autocast: torch.dtype | None = None, batch: int = 64) -> VisionFeatureStore:
    """Encode every image `sources` name that DIR's store (for this vision expert) lacks; return the store.

    The vision expert must be frozen (its features would change as it trains). `autocast`: the training's mixed
    precision (bf16 / fp16), under which the vision expert would have run in each step."""
    from safetensors.torch import save_file

    if any(p.requires_grad for p in model.vision.parameters()):
        raise ConfigError("speed.vision_features needs a frozen vision expert (parts.vision: frozen): a vision "
                          "expert that trains gives other features every step")
    directory = Path(directory)
    mark = fingerprint(model, autocast)
    index = {"fingerprint": mark, "rows": {}, "bad": {}, "shards": []}
    if (directory / INDEX).is_file():
        old, why = _readable(directory)
        if old is not None and old.get("fingerprint") == mark:
            index = old
        else:
            log.warning("vision features: %s %s: computing them anew", directory,
                        why or "holds another vision expert's features")
            for f in directory.glob("shard-*.safetensors"):
                f.unlink()
    wanted = _images(sources)
    todo = [(k, v) for k, v in wanted.items() if k not in index["rows"] and k not in index["bad"]]
    log.info("vision features: %d image(s), %d already in %s, %d to encode", len(wanted), len(wanted) - len(todo),
             directory, len(todo))
    try:
        if todo:
            directory.mkdir(parents=True, exist_ok=True)
            vision = model.vision
            moved_from = next(vision.parameters()).device
            vision.to(device)
            try:
                _encode(model, todo, directory, index, batch, save_file, autocast)
            finally:
                vision.to(moved_from)
            tmp = directory / (INDEX + ".tmp")
            tmp.write_text(json.dumps(index))
            os.replace(tmp, directory / INDEX)  # the index last: a store interrupted before it is not used
        elif not (directory / INDEX).is_file():
            directory.mkdir(parents=True, exist_ok=True)
            (directory / INDEX).write_text(json.dumps(index))
    except OSError as exc:
        raise SeeChatError(f"vision features: cannot write the store in {directory} ({exc}): free space there, "
                           "set speed.vision_features_dir to another folder, or speed.vision_features false") from exc
    return VisionFeatureStore(directory)


def _readable(directory: Path) -> tuple[dict | None, str | None]:
    """The store's index, or None and why it cannot be used (an unreadable index, a shard missing or damaged)."""
    from safetensors import SafetensorError, safe_open

    try:
        index = json.loads((directory / INDEX).read_text())
        for name in index["shards"]:
            with safe_open(str(directory / name), framework="pt") as f:
                if "features" not in f.keys():
                    return None, f"has a shard without features ({name})"
        return index, None
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
        return None, f"has an unreadable index or shard ({exc.__class__.__name__}: {str(exc)[:120]})"


def _decode(processor, part: list, index: dict) -> tuple[list[str], torch.Tensor | None]:
    """One batch's keys and pixel values (unreadable images recorded in index["bad"])."""
    images, names = [], []
    for key, (image, root) in part:
        try:
            images.append(open_image(image, root))
            names.append(key)
        except ImageError as exc:
            index["bad"][key] = str(exc)
    return names, processor.pixel_values(images) if images else None


def _encode(model, todo: list, directory: Path, index: dict, batch: int, save_file, autocast) -> None:
    from concurrent.futures import ThreadPoolExecutor

    vision, processor = model.vision, model.processor
    device = next(vision.parameters()).device
    bar = tqdm(total=len(todo), desc="vision features", unit="image", leave=False)
    parts = [todo[b:b + batch] for b in range(0, len(todo), batch)]
    with ThreadPoolExecutor(1) as pool:  # the next batch is decoded while this one is encoded
        ahead = pool.submit(_decode, processor, parts[0], index) if parts else None
        rows, keys = [], []
        for k, part in enumerate(parts):
            names, pixels = ahead.result()
            ahead = pool.submit(_decode, processor, parts[k + 1], index) if k + 1 < len(parts) else None
            if pixels is not None:
                with torch.no_grad(), torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                    rows.append(vision(pixels.to(device=device, dtype=vision.dtype)).cpu())
                keys += names
            bar.update(len(part))
            if keys and (len(keys) >= SHARD_IMAGES or ahead is None):
                name = f"shard-{len(index['shards']):05d}.safetensors"
                save_file({"features": torch.cat(rows).contiguous()}, str(directory / name))
                index["rows"].update({key: [len(index["shards"]), i] for i, key in enumerate(keys)})
                index["shards"].append(name)
                rows, keys = [], []
    bar.close()
