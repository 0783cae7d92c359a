"""The decoding loop under every front end: answers join and leave a running batch between two steps.

    row = engine.begin(state, settings, reply=reply, on_piece=print)   # prompt prefilled, first token's logits
    batch = Batch(engine.model, max_rows=8)
    batch.add(row)
    while batch.rows:
        batch.step()          # one token for every row; a finished row leaves at once (Row.on_finish)
        ...                   # more rows may join here (continuous batching)

Hand-written rather than transformers' own continuous batching (`generate_batch`, `init_continuous_batching`):
that takes token ids only, and a SeeChat prompt is embeddings with images scattered in, so each row is prefilled
by the engine (reusing whatever KV cache it has) and joins here with its cache.

Rows are aligned on the right: the batch's KV cache holds each row's positions at its end, padded on the left,
with an attention mask over the padding and each row's own position ids, so a row gets the tokens it would get
alone. Each row keeps its own sampling settings and random generator (a seeded answer does not depend on its
neighbours), repetition penalty over its own tokens, stop strings, token limit and cancel flag. Decoding runs on
the calling thread: no thread is started per answer (on this kind of CPU, OpenMP spins less once more threads
than cores exist, and a generation on a helper thread ran 1.8x slower).
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from transformers import (
    DynamicCache,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.cache_utils import DynamicLayer

if TYPE_CHECKING:
    from ..model.seechat import SeeChat
    from .engine import GenerationSettings, Reply


@dataclass
class Row:
    """One answer being generated: its prompt, the KV cache of the whole prompt with the logits of its last position
    (the first answer token is chosen from them when the row joins a batch), and what it made."""

    ids: list[int]
    cache: DynamicCache | None
    settings: "GenerationSettings"
    max_new: int
    reply: "Reply"
    cancel: threading.Event = field(default_factory=threading.Event)
    on_piece: Callable[[str], None] = lambda text: None
    """Gets the answer's text as it is made (held back while it could still be the start of a stop string)."""
    on_finish: Callable[["Row", DynamicCache | None], None] = lambda row, cache: None
    """Called once when the row is done: with the row's own KV cache (prompt and answer but the last token)
    when `keep_cache`, else None. `reply` holds the text, tokens and finish reason by then."""
    keep_cache: bool = False
    first_logits: torch.Tensor | None = None
    """(1, vocabulary) logits after the prompt, from the prefill."""
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    """The answer's text up to the start of its current line (see _Stream)."""
    line_start: int = 0
    sent: int = 0
    done: bool = False
    pending: int = -1
    """The token this row feeds at the next step: the newest one it chose."""
    processors: LogitsProcessorList | None = None
    generator: torch.Generator | None = None
    history: torch.Tensor | None = None
    """Prompt and answer ids, for the repetition penalty."""

    def __post_init__(self) -> None:
        s = self.settings
        procs = []
        if s.repetition_penalty != 1.0:
            procs.append(RepetitionPenaltyLogitsProcessor(penalty=s.repetition_penalty))
            self.history = torch.tensor([self.ids])
        if s.temperature > 0:
            procs.append(TemperatureLogitsWarper(s.temperature))
            if s.top_k:
                procs.append(TopKLogitsWarper(s.top_k))
            if s.top_p < 1.0:
                procs.append(TopPLogitsWarper(s.top_p))
        self.processors = LogitsProcessorList(procs) if procs else None


class Batch:
    """Rows decoding together; `add` and `step` run on one thread (the caller's)."""

    def __init__(self, model: "SeeChat", max_rows: int = 1):
        self.model, self.llm = model, model.llm
        self.stop_ids = set(model.stop_token_ids)
        # rows can share a batch only where every cache layer is a plain one (sliding-window layers keep a
        # window per row that left padding would shift): otherwise they take turns
        layers = DynamicCache(config=self.llm.config).layers
        self.capacity = max_rows if all(type(layer) is DynamicLayer for layer in layers) else 1
        self.rows: list[Row] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None
        """(rows, cache length) with 0 over left padding, or None while no row is padded."""

    @property
    def room(self) -> int:
        return self.capacity - len(self.rows)

    def add(self, row: Row) -> bool:
        """Choose `row`'s first token and let it join before the next step (its cache is read, never changed).
        Returns False when that token already ended the answer (the row finished without joining)."""
        if self.room < 1:
            raise RuntimeError("the batch is full")
        self._ready(row)
        if self._advance([row], self._pick([row], row.first_logits)):
            row.on_finish(row, row.cache if row.keep_cache else None)
            return False
        if not self.rows:
            self.cache, self.mask = fork_cache(row.cache), None
            self.rows.append(row)
            return True
        old, new = self.cache.get_seq_length(), row.cache.get_seq_length()
        width = max(old, new)
        merged = fork_cache(self.cache)
        for mine, theirs in zip(merged.layers, row.cache.layers):
            if not _holds(mine) and not _holds(theirs):
                continue
            like = mine if _holds(mine) else theirs
            for name in ("keys", "values"):
                a = getattr(mine, name) if _holds(mine) else _empty(like, name, len(self.rows))
                b = getattr(theirs, name) if _holds(theirs) else _empty(like, name, 1)
                setattr(mine, name, torch.cat([_pad_left(a, width - old, 2), _pad_left(b, width - new, 2)]))
            if not mine.is_initialized:
                _initialise_like(mine, like)
        device = self.model.device
        mask = self.mask if self.mask is not None else torch.ones(len(self.rows), old, dtype=torch.long, device=device)
        ones = torch.ones(1, new, dtype=torch.long, device=device)
        self.cache = merged
        self.mask = torch.cat([_pad_left(mask, width - old, 1), _pad_left(ones, width - new, 1)])
        self.rows.append(row)
        return True

    @torch.no_grad()
    def fill(self, rows: list[Row], image_embeds: torch.Tensor | None = None) -> None:
        """Start the (empty) batch with fresh prompts prefilled together: rows whose `cache` is None, their prompts
        padded on the left, `image_embeds` scattered at their image positions in row order (as model.embed does).
        What `seechat eval` and `seechat caption` run: one prefill for the whole batch instead of one per row."""
        if self.rows:
            raise RuntimeError("fill starts an empty batch")
        model = self.model
        ids, mask = left_padded([r.ids for r in rows], pad_id(model), model.device)
        self.cache = DynamicCache(config=self.llm.config)
        embeds = model.embed(ids, image_embeds)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, cache=self.cache,
                       use_cache=True, logits_to_keep=1)
        self.mask = None if bool(mask.all()) else mask
        self.rows = list(rows)
        for row in rows:
            self._ready(row)
        self._finish(self._advance(rows, self._pick(rows, out.logits[:, -1])))

    @torch.no_grad()
    def fill_shared(self, rows: list[Row], prefix: int, images: list[int], image_embeds: torch.Tensor) -> None:
        """`fill` for fresh prompts whose first `prefix` ids are the same in every row and hold each row's only
        image (many questions about a few pictures, as an evaluation asks them): that start is prefilled once per
        distinct picture (`images[i]`: row i's picture, indexing `image_embeds` (pictures, N, D)), its keys and
        values shared by the picture's rows, then the rest of every prompt is prefilled together, padded on the
        left of that rest (the mask covers the hole). The same answers as `fill` for about a third less work."""
        if self.rows:
            raise RuntimeError("fill starts an empty batch")
        model, device = self.model, self.model.device
        start = torch.tensor([rows[0].ids[:prefix]] * image_embeds.shape[0], device=device)
        self.cache = DynamicCache(config=self.llm.config)
        self.llm(inputs_embeds=model.embed(start, image_embeds), cache=self.cache, use_cache=True, logits_to_keep=1)
        pick = torch.tensor(images, device=device)
        for layer in self.cache.layers:
            if _holds(layer):
                layer.keys, layer.values = layer.keys.index_select(0, pick), layer.values.index_select(0, pick)
        ids, rest = left_padded([r.ids[prefix:] for r in rows], pad_id(model), device)
        mask = torch.cat([torch.ones(len(rows), prefix, dtype=torch.long, device=device), rest], 1)
        positions = prefix + (rest.cumsum(-1) - 1).clamp(min=0)
        out = self.llm(inputs_embeds=model.embed(ids), attention_mask=mask, position_ids=positions, cache=self.cache,
                       use_cache=True, logits_to_keep=1)
        self.mask = None if bool(rest.all()) else mask
        self.rows = list(rows)
        for row in rows:
            self._ready(row)
        self._finish(self._advance(rows, self._pick(rows, out.logits[:, -1])))

    @torch.no_grad()
    def step(self) -> list[Row]:
        """One token for every row; returns the rows that finished (they have left the batch)."""
        rows, device = self.rows, self.model.device
        fed = torch.tensor([[r.pending] for r in rows], device=device)
        if self.mask is None:
            out = self.llm(input_ids=fed, cache=self.cache, use_cache=True, logits_to_keep=1)
        else:
            positions = self.mask.sum(1, keepdim=True)
            self.mask = torch.cat([self.mask, torch.ones(len(rows), 1, dtype=torch.long, device=device)], 1)
            out = self.llm(input_ids=fed, attention_mask=self.mask, position_ids=positions, cache=self.cache,
                           use_cache=True, logits_to_keep=1)
        finished = self._advance(rows, self._pick(rows, out.logits[:, -1]))
        return self._finish(finished)

    def fail_all(self) -> list[Row]:
        """Drop every row (after an error in a step): returns them; none of them gets on_finish."""
        rows, self.rows, self.cache, self.mask = self.rows, [], None, None
        for row in rows:
            row.done = True
        return rows

    # -- internals ------------------------------------------------------------------------------------
    def _ready(self, row: Row) -> None:
        if row.generator is None and row.settings.temperature > 0:
            row.generator = torch.Generator(device=self.model.device)
            # its own seed, or one drawn from torch's global generator (so torch.manual_seed repeats a run)
            seed = row.settings.seed if row.settings.seed is not None else int(torch.randint(2**62, ()))
            row.generator.manual_seed(seed)
        if row.history is not None:
            row.history = row.history.to(self.model.device)

    def _pick(self, rows: list[Row], logits: torch.Tensor) -> list[int]:
        """Each row's next token from its (rows, vocabulary) logits."""
        if self.model.image_token_id < logits.shape[-1]:
            logits[:, self.model.image_token_id] = float("-inf")  # the image placeholder is never generated
        if all(r.processors is None for r in rows):
            return logits.argmax(-1).tolist()
        return [self._choose(r, logits[i : i + 1]) for i, r in enumerate(rows)]

    def _advance(self, rows: list[Row], chosen: list[int]) -> list[int]:
        """Give each row its token (streamed, stop strings matched); the indices of the rows that are done."""
        finished = []
        for i, (row, token) in enumerate(zip(rows, chosen)):
            row.pending = token
            if _Stream.step(row, token, self.stop_ids, self.model.tokenizer):
                finished.append(i)
        return finished

    def _finish(self, finished: list[int]) -> list[Row]:
        """Hand the finished rows their caches and let them leave."""
        rows = self.rows
        for i in finished:
            rows[i].on_finish(rows[i], self._own_cache(i) if rows[i].keep_cache else None)
        if finished:
            self._leave(finished)
        return [rows[i] for i in finished]

    def _choose(self, row: Row, scores: torch.Tensor) -> int:
        if row.processors is not None:
            scores = row.processors(row.history, scores.float())
        if row.settings.temperature > 0:
            token = int(torch.multinomial(torch.softmax(scores, -1), 1, generator=row.generator))
        else:
            token = int(scores.argmax(-1))
        if row.history is not None:
            row.history = torch.cat([row.history, row.history.new_tensor([[token]])], 1)
        return token

    def _own_cache(self, i: int) -> DynamicCache:
        """Row i's keys and values alone (copied out of the batch's tensors when others share them)."""
        if len(self.rows) == 1:
            return self.cache
        pad = 0 if self.mask is None else int((self.mask[i] == 0).sum())
        own = fork_cache(self.cache)
        for layer in own.layers:
            if _holds(layer):
                layer.keys = layer.keys[i : i + 1, :, pad:].clone()
                layer.values = layer.values[i : i + 1, :, pad:].clone()
        return own

    def _leave(self, gone: list[int]) -> None:
        keep = [i for i in range(len(self.rows)) if i not in set(gone)]
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache, self.mask = None, None
            return
        index = torch.tensor(keep, device=self.model.device)
        self.cache.batch_select_indices(index)
        if self.mask is not None:
            self.mask = self.mask[index]
            if self.capacity == 1:  # sliding-window layers: their length is not the mask's; leave them whole
                return
            lead = int((self.mask.sum(0) == 0).long().cumprod(0).sum())  # columns that are padding in every row
            if lead:
                for layer in self.cache.layers:
                    if _holds(layer):
                        layer.keys, layer.values = layer.keys[:, :, lead:], layer.values[:, :, lead:]
                self.mask = self.mask[:, lead:]
            if bool(self.mask.all()):
                self.mask = None


class _Stream:
    """Per-row text: decodes only the row's current line each step (as transformers' TextStreamer does), matches
    stop strings, holds back what could still become one, and decides when the row is done."""

    @staticmethod
    def step(row: Row, token: int, stop_ids: set[int], tok) -> bool:
        settings = row.settings
        if row.cancel.is_set():
            return _Stream.finish(row, row.text, "cancelled")
        row.tokens.append(token)
        line = tok.decode(row.tokens[row.line_start :], skip_special_tokens=True)
        text = row.text + line
        if line.endswith("\n"):
            row.text, row.line_start = text, len(row.tokens)
        cut = find_stop(text, settings.stop)
        if cut is not None:
            return _Stream.finish(row, text[:cut], "stop")
        if token in stop_ids:
            return _Stream.finish(row, text, "stop")
        if len(row.tokens) >= row.max_new:
            return _Stream.finish(row, text, "length")
        hold = max((len(s) for s in settings.stop), default=1) - 1
        safe = len(text) - hold
        while safe > row.sent and text[safe - 1] == "\ufffd":  # half a character: wait for the rest
            safe -= 1
        if safe > row.sent:
            row.on_piece(text[row.sent : safe])
            row.sent = safe
        return False

    @staticmethod
    def finish(row: Row, text: str, reason: str) -> bool:
        row.done = True
        reply = row.reply
        reply.text, reply.finish_reason = text, reason
        reply.token_ids, reply.completion_tokens = list(row.tokens), len(row.tokens)
        if reason != "cancelled" and len(text) > row.sent:
            row.on_piece(text[row.sent :])
            row.sent = len(text)
        return True


def find_stop(text: str, stop: list[str]) -> int | None:
    """Where the first of the stop strings starts in `text`, or None."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(hits) if hits else None


def fork_cache(cache: DynamicCache) -> DynamicCache:
    """A cache that starts as `cache` and can be cropped, extended or regrouped without changing it.

    DynamicCache layers replace their tensors on every update and crop (torch.cat, slicing), never write into
    them, so copying the layer objects shares the tensors without copying them.
    """
    forked = copy.copy(cache)
    forked.layers = [copy.copy(layer) for layer in cache.layers]
    return forked



def _pad_left(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    if n <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim)


def pad_id(model) -> int:
    """A padding id that is not the image placeholder (padding must not take an image's place)."""
    tok = model.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    return tok.eos_token_id if pad == model.image_token_id else pad


def left_padded(rows: list[list[int]], pad: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows padded on the left to one width, and the attention mask (0 over the padding)."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask


def _holds(layer) -> bool:
    """Whether a cache layer holds (batch, heads, length, dim) tensors yet."""
    return bool(layer.is_initialized) and layer.keys is not None and layer.keys.dim() == 4


def _empty(like, name: str, rows: int) -> torch.Tensor:
    t = getattr(like, name)
    return t.new_zeros((rows, t.shape[1], 0, *t.shape[3:]))


def _initialise_like(layer, like) -> None:
    for attr in ("is_initialized", "dtype", "device"):
        if hasattr(like, attr):
            setattr(layer, attr, getattr(like, attr))
