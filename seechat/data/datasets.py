"""Datasets for training: records -> token ids, loss labels and pixels; bad samples are skipped and counted.

A bad sample (missing or corrupt image, empty text, a sequence over max_length once images are expanded,
a broken record) becomes {"bad": (where, reason)}; the collator drops it from the batch and the trainer
counts it (see seechat.train.trainer).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info
from transformers import DataCollatorWithFlattening

from ..errors import ImageError, SeeChatError
from .images import load_image
from .processor import IGNORE_INDEX, SeeChatProcessor
from .sources import BadSample, DataSource, IndexedSource, Record, stream_records


class Encoder:
    """Turns a Record into model inputs with one render (ids and loss labels together)."""

    def __init__(self, processor: SeeChatProcessor, max_length: int, features=None):
        self.processor, self.max_length = processor, max_length
        self.features = features
        """A VisionFeatureStore (seechat.data.features): each image's features instead of its pixels."""

    def __call__(self, record: Record, root) -> dict:
        if self.features is not None:  # features of each image (BadSample where one was unreadable)
            images = [self.features.features(im, root) for im in record.images]
        else:
            try:
                images = [open_image(im, root, record.where) for im in record.images]
            except ImageError as exc:
                raise BadSample(str(exc)) from exc
        try:
            rendered = self.processor.render(record.messages, num_images=len(images), with_labels=True)
        except SeeChatError as exc:
            raise BadSample(str(exc)) from exc
        n = len(rendered.input_ids)
        if n > self.max_length:
            raise BadSample(f"{n} tokens once images are expanded, over max_length {self.max_length}")
        if all(t == IGNORE_INDEX for t in rendered.labels):
            raise BadSample("no answer tokens to learn from")
        if self.features is not None:
            return {"input_ids": rendered.input_ids, "labels": rendered.labels, "pixel_values": None,
                    "image_features": torch.stack(images) if images else None}
        pixels = self.processor.pixel_values(images) if images else None
        return {"input_ids": rendered.input_ids, "labels": rendered.labels, "pixel_values": pixels}


def open_image(image, root, where: str | None = None):
    """A record's image, a path under `root` or raw bytes, decoded (ImageError names it)."""
    if isinstance(image, bytes):
        return load_image(image, name=f"the image of {where}" if where else "an image given as bytes")
    return load_image(os.path.join(root, str(image)), name=f"'{image}'")


def _sample(encoder: Encoder, fetch, root, where: str) -> dict:
    """encoder(fetch()) as a training sample, or {"bad": (where, why)} when the record or its images are unusable."""
    try:
        return {**encoder(fetch(), root), "where": where}
    except BadSample as exc:
        return {"bad": (where, str(exc))}


class IndexedDataset(Dataset):
    """Random-access training data over JSONL / LLaVA JSON sources (only line offsets are held in memory)."""

    def __init__(self, sources: list[DataSource], processor: SeeChatProcessor, *, prompts: list[str],
                 max_length: int, seed: int = 0):
        self.parts = [IndexedSource(s, prompts, seed) for s in sources]
        self.encoder = Encoder(processor, max_length)
        """Its `features` may be set to a VisionFeatureStore over these parts' images (`speed.vision_features`)."""
        self.num_image_tokens = processor.num_image_tokens
        self._starts = [0]
        for p in self.parts:
            self._starts.append(self._starts[-1] + len(p))

    def __len__(self) -> int:
        return self._starts[-1]

    def _locate(self, i: int):
        for k, part in enumerate(self.parts):
            if i < self._starts[k + 1]:
                return part, i - self._starts[k]
        raise IndexError(i)

    def __getitem__(self, i: int) -> dict:
        part, j = self._locate(i)
        return {**_sample(self.encoder, lambda: part.record(j), part.source.root, f"{part.source.path}:{j + 1}"),
                "index": i}

    def lengths(self) -> list[int]:
        """Cheap size estimates for length-grouped batching (no image is opened)."""
        return (np.concatenate([p.ends - p.offsets for p in self.parts]) + self.num_image_tokens).tolist()


class StreamDataset(IterableDataset):
    """Streamed training data (CSV, webdataset shards, or a mix): endless, each rank and worker reads its share.

    Training on it needs training.max_steps (a stream has no length). Indexed sources mixed in are read in a
    seeded random order, sharded the same way.
    """

    def __init__(self, sources: list[DataSource], processor: SeeChatProcessor, *, prompts: list[str],
                 max_length: int, seed: int = 0, shuffle_buffer: int = 256):
        self.sources, self.prompts, self.seed, self.shuffle_buffer = sources, prompts, seed, shuffle_buffer
        self.encoder = Encoder(processor, max_length)
        self.indexed = {i: IndexedSource(s, prompts, seed) for i, s in enumerate(sources) if not s.streamed}

    def __iter__(self) -> Iterator[dict]:
        rank, world = _rank_world()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        rng = random.Random(f"{self.seed}:{rank}:{worker}")
        buffer: list[dict] = []
        epoch = 0
        while True:  # endless: training.max_steps decides when to stop
            produced = 0
            streams = [self._records(i, s, epoch, rank, world, worker, workers) for i, s in enumerate(self.sources)]
            while streams:  # interleave the sources round-robin
                for stream in list(streams):
                    item = next(stream, None)
                    if item is None:
                        streams.remove(stream)
                        continue
                    buffer.append(item)
                    produced += 1
                    if len(buffer) >= self.shuffle_buffer:
                        yield buffer.pop(rng.randrange(len(buffer)))
            if not produced:
                raise SeeChatError(f"the training data has no records for rank {rank}, worker {worker}: "
                                   "check the data paths, or use fewer processes or dataloader workers")
            epoch += 1

    def _records(self, i, source, epoch, rank, world, worker, workers) -> Iterator[dict]:
        if source.streamed:
            for item in stream_records(source, self.prompts, self.seed, epoch, rank, world, worker, workers):
                if isinstance(item, BadSample):
                    yield {"bad": (getattr(item, "where", source.path), str(item))}
                else:
                    yield _sample(self.encoder, lambda: item, source.root, item.where)
            return
        part = self.indexed[i]
        order = list(range(len(part)))
        random.Random(f"{self.seed}:{epoch}:{i}").shuffle(order)
        for j in order[rank * workers + worker :: world * workers]:
            yield _sample(self.encoder, lambda: part.record(j), source.root, f"{source.path}:{j + 1}")


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class Collator:
    """Right-pads a batch (or, with packing, joins its samples into rows); drops bad samples and reports them in
    the batch (the trainer counts them).

    packing: False (each sample a row, right-padded), True (the whole batch one row: transformers'
    DataCollatorWithFlattening) or "rows" (the samples first-fit into rows as wide as the longest, position ids
    restarting per sample and per padding tail, so a batch of 8 conversations of 60-400 tokens computes about
    three quarters of the tokens it would padded; the same loss and gradients)."""

    def __init__(self, pad_token_id: int, packing: bool | str = False):
        if packing not in (False, True, "rows"):
            raise SeeChatError(f"speed.packing must be false, true or rows, got {packing!r}")
        self.pad_token_id, self.packing = pad_token_id, packing
        self.flatten = DataCollatorWithFlattening(return_position_ids=True) if packing is True else None

    def __call__(self, samples: list[dict]) -> dict:
        good = [s for s in samples if "bad" not in s]
        bad = [s["bad"] for s in samples if "bad" in s]
        if self.packing is True and good:
            # One row, position ids restarting per sample, no attention mask: the text expert keeps the samples
            # apart from the position ids; each sample's first label is masked so none predicts across a seam.
            batch = dict(self.flatten([{"input_ids": s["input_ids"], "labels": s["labels"]} for s in good]))
        elif self.packing == "rows" and good:
            rows = [[good[i] for i in row] for row in _first_fit([len(s["input_ids"]) for s in good])]
            good = [s for row in rows for s in row]  # the images' features follow the tokens' order
            batch = self._rows(rows)
        else:
            width = max((len(s["input_ids"]) for s in good), default=0)
            ids = torch.full((len(good), width), self.pad_token_id, dtype=torch.long)
            labels = torch.full((len(good), width), IGNORE_INDEX, dtype=torch.long)
            mask = torch.zeros((len(good), width), dtype=torch.long)
            for row, s in enumerate(good):
                n = len(s["input_ids"])
                ids[row, :n] = torch.tensor(s["input_ids"])
                labels[row, :n] = torch.tensor(s["labels"])
                mask[row, :n] = 1
            batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        pixels = [s["pixel_values"] for s in good if s["pixel_values"] is not None]
        features = [s["image_features"] for s in good if s.get("image_features") is not None]
        if features:  # a store gives every image's features, so a batch has features or pixels, never both
            batch["image_features"] = torch.cat(features)
        batch.update({
            "pixel_values": torch.cat(pixels) if pixels else torch.zeros(0),
            "bad_samples": bad,
            "sample_where": [s.get("where") for s in good],
        })
        if all("index" in s for s in samples):
            batch["sample_index"] = torch.tensor([s["index"] for s in samples])
        return batch

    def _rows(self, rows: list[list[dict]]) -> dict:
        """The samples of each row side by side; no attention mask: the text expert keeps the samples (and each
        row's padding tail, positions restarting at 0) apart by their position ids."""
        width = max(len(s["input_ids"]) for samples in rows for s in samples)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        for row, samples in enumerate(rows):
            at = 0
            for s in samples:
                n = len(s["input_ids"])
                ids[row, at:at + n] = torch.tensor(s["input_ids"])
                labels[row, at + 1:at + n] = torch.tensor(s["labels"][1:])  # the first would be the last one's target
                positions[row, at:at + n] = torch.arange(n)
                at += n
            positions[row, at:] = torch.arange(width - at)
        return {"input_ids": ids, "labels": labels, "position_ids": positions}


def _first_fit(lengths: list[int]) -> list[list[int]]:
    """Indices of samples grouped into rows no longer than the longest sample: first-fit, longest first."""
    width, rows, room = max(lengths), [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = next((r for r, left in enumerate(room) if left >= lengths[i]), None)
        if r is None:
            rows.append([]), room.append(width)
            r = len(rows) - 1
        rows[r].append(i)
        room[r] -= lengths[i]
    return rows


__all__ = ["IndexedDataset", "StreamDataset", "Collator", "Encoder"]
