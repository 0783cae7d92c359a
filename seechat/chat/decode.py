"""The decoding loop under every front end: answers join and leave a running batch between two steps.

    rows = [engine.begin(state, settings, reply=reply, on_piece=print) for state in states]  # not yet prefilled
    batch = Batch(engine.model, max_rows=8)
    batch.join(rows)          # their prompts prefilled together, each row's first token chosen
    while batch.rows:
        batch.step()          # one token for every row; a finished row leaves at once (Row.on_finish)
        ...                   # more rows may join here (continuous batching)

Hand-written rather than transformers' own continuous batching (`generate_batch`, `init_continuous_batching`):
that takes token ids only, and a SeeChat prompt is embeddings with images scattered in, and each row may bring
the KV cache of its conversation's earlier turns.

Rows are aligned on the right: the batch's KV cache holds each row's positions at its end, with an attention mask
over the padding and each row's own position ids, so a row gets the tokens it would get alone. Rows joining
together are prefilled in one forward: each row's reused cache left-padded to the longest, then its new positions
left-padded to the longest, so a row's positions can have a gap of padding between its cached and its new part
(the mask covers it). Each row keeps its own sampling settings and random generator (a seeded answer does not
depend on its neighbours), repetition penalty over its own tokens, stop strings, token limit and cancel flag.
Decoding runs on the calling thread: no thread is started per answer (on this kind of CPU, OpenMP spins less once
more threads than cores exist, and a generation on a helper thread ran 1.8x slower).
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
    """One answer being generated: its prompt, the KV cache of the part of the prompt already computed (None for
    none) and the embeddings of the rest (`todo`, prefilled when the row joins a batch), and what it made."""

    ids: list[int]
    cache: DynamicCache | None
    settings: "GenerationSettings"
    max_new: int
    reply: "Reply"
    cancel: threading.Event = field(default_factory=threading.Event)
    on_piece: Callable[[str], None] | None = None
    """Gets the answer's text as it is made (held back while it could still be the start of a stop string). With
    None and no stop strings the text is decoded once, when the row is done (as generate's callers decode)."""
    on_finish: Callable[["Row", DynamicCache | None], None] = lambda row, cache: None
    """Called once when the row is done: with the row's own KV cache (prompt and answer but the last token)
    when `keep_cache`, else None. `reply` holds the text, tokens and finish reason by then."""
    keep_cache: bool = False
    todo: torch.Tensor | None = None
    """(1, n, hidden) input embeddings of the prompt positions past `cache` (at least one)."""
    inputs: object = None
    """What the engine needs to make `todo` when the row's images are encoded (ChatEngine.encode)."""
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

    @torch.no_grad()
    def join(self, rows: list[Row]) -> list[Row]:
        """Prefill `rows` together (one forward), choose each one's first token and let them join before the next
        step. Their caches are read, never changed. Returns the rows that the first token already finished (they
        got on_finish and did not join). Nothing joins when the forward fails."""
        if len(rows) > self.room:
            raise RuntimeError(f"{len(rows)} rows do not fit in a batch with room for {self.room}")
        if not rows:
            return []
        device = self.model.device
        past = [0 if r.cache is None else r.cache.get_seq_length() for r in rows]
        new = [r.todo.shape[1] for r in rows]
        width, longest = max(past), max(new)
        right = self._prefill_right(rows, new) if width == 0 and min(new) < longest else None
        if right is not None:
            logits, mask, cache = right
        else:
            cache = _stack([r.cache for r in rows], past, [1] * len(rows), self.llm.config)
            mask = torch.zeros(len(rows), width + longest, dtype=torch.long, device=device)
            for i, (p, n) in enumerate(zip(past, new)):
                mask[i, width - p : width] = 1
                mask[i, width + longest - n :] = 1
            embeds = torch.cat([_pad_left(r.todo.to(device), longest - n, 1) for r, n in zip(rows, new)])
            if bool(mask.all()):  # nothing padded: the same call a single prompt makes
                out = self.llm(inputs_embeds=embeds, cache=cache, use_cache=True, logits_to_keep=1)
                mask = None
            else:
                positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, width:]
                out = self.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, cache=cache,
                               use_cache=True, logits_to_keep=1)
            logits = out.logits[:, -1]
        for row in rows:
            self._ready(row)
            row.todo = None  # prefilled: its embeddings are not needed any more
        finished = self._advance(rows, self._pick(rows, logits))
        before = len(self.rows)
        if not self.rows:
            self.cache, self.mask = cache, mask
        else:
            old = self.cache.get_seq_length()
            full = max(old, width + longest)
            self.cache = _stack([self.cache, cache], [old, width + longest], [before, len(rows)], self.llm.config)
            ones = lambda n, w: torch.ones(n, w, dtype=torch.long, device=device)  # noqa: E731
            self.mask = torch.cat([_pad_left(self.mask if self.mask is not None else ones(before, old), full - old, 1),
                                   _pad_left(mask if mask is not None else ones(len(rows), width + longest),
                                             full - width - longest, 1)])
            if bool(self.mask.all()):
                self.mask = None
        self.rows = [*self.rows, *rows]
        return self._finish([before + i for i in finished])

    def _prefill_right(self, rows: list[Row], new: list[int]):
        """Fresh prompts of several lengths, padded on the right: the forward needs no attention mask (padding
        after a row's prompt is never attended to by it under the causal rule), so attention takes its causal fast
        path; each row's logits are taken at its own last position. Returns the logits, the mask the batch keeps
        (0 over the padding, which the row's answer must not attend to) and the cache, or None when the text
        expert's forward cannot keep per-row positions (then the caller pads on the left)."""
        device, longest = self.model.device, max(new)
        embeds = torch.cat([_pad_right(r.todo.to(device), longest - n, 1) for r, n in zip(rows, new)])
        last = torch.tensor([[n - 1] for n in new], device=device)
        cache = DynamicCache(config=self.llm.config)
        try:
            out = self.llm(inputs_embeds=embeds, cache=cache, use_cache=True, logits_to_keep=last)
        except (TypeError, IndexError, RuntimeError):
            return None
        if tuple(out.logits.shape[:2]) != (len(rows), 1):
            return None
        mask = torch.ones(len(rows), longest, dtype=torch.long, device=device)
        for i, n in enumerate(new):
            mask[i, n:] = 0
        return out.logits[:, -1], mask, cache

    @torch.no_grad()
    def fill(self, rows: list[Row], image_embeds: torch.Tensor | None = None) -> None:
        """Start the (empty) batch with fresh prompts (rows whose `cache` is None), `image_embeds` scattered at their
        image positions in row order (as model.embed does): what `seechat eval` and `seechat caption` run."""
        if self.rows:
            raise RuntimeError("fill starts an empty batch")
        ids, mask = left_padded([r.ids for r in rows], pad_id(self.model), self.model.device)
        embeds = self.model.embed(ids, image_embeds)
        for i, row in enumerate(rows):
            row.todo = embeds[i : i + 1, ids.shape[1] - len(row.ids) :]
        self.join(rows)

    @torch.no_grad()
    def fill_shared(self, rows: list[Row], prefix: int, images: list[int], image_embeds: torch.Tensor) -> None:
        """`fill` for fresh prompts whose first `prefix` ids are the same in every row and hold each row's only
        image (many questions about a few pictures, as an evaluation asks them): that start is prefilled once per
        distinct picture (`images[i]`: row i's picture, indexing `image_embeds` (pictures, N, D)), and each row
        joins with its picture's keys and values as its cache and the rest of its prompt to prefill (`join`).
        The same answers as `fill` for about a third less work."""
        if self.rows:
            raise RuntimeError("fill starts an empty batch")
        model, device = self.model, self.model.device
        start = torch.tensor([rows[0].ids[:prefix]] * image_embeds.shape[0], device=device)
        shared = DynamicCache(config=self.llm.config)
        self.llm(inputs_embeds=model.embed(start, image_embeds), cache=shared, use_cache=True, logits_to_keep=1)
        for row, picture in zip(rows, images):
            row.cache = fork_cache(shared)
            for layer in row.cache.layers:
                if _holds(layer):
                    layer.keys, layer.values = layer.keys[picture : picture + 1], layer.values[picture : picture + 1]
            row.todo = model.embed(torch.tensor([row.ids[prefix:]], device=device))
        self.join(rows)

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
            out = self.llm(input_ids=fed, attention_mask=self._step_mask(), position_ids=positions, cache=self.cache,
                           use_cache=True, logits_to_keep=1)
        finished = self._advance(rows, self._pick(rows, out.logits[:, -1]))
        return self._finish(finished)

    def _step_mask(self) -> torch.Tensor:
        """The mask of a one-token step: with one query per row the causal rule hides nothing, so the padding mask
        alone, given in the 4-D form the attention takes (transformers passes a 4-D mask through as it is). Made
        here because building it through transformers' general mask functions cost a tenth of a small model's
        step; where the attention takes another form, the 2-D mask goes to transformers as usual."""
        how = getattr(self.llm.config, "_attn_implementation", None)
        if self.capacity == 1 or how not in ("sdpa", "eager"):
            return self.mask
        keep = self.mask.bool()[:, None, None, :]
        if how == "sdpa":
            return keep  # True: attend
        dtype = self.llm.get_input_embeddings().weight.dtype
        return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)

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
        own = fork_cache(self.cache)
        kept = None if self.mask is None else self.mask[i].bool()  # its positions, without padding before or between
        for layer in own.layers:
            if _holds(layer):
                keys, values = layer.keys[i : i + 1], layer.values[i : i + 1]
                if kept is not None:
                    keys, values = keys[:, :, kept[-keys.shape[2]:]], values[:, :, kept[-values.shape[2]:]]
                layer.keys, layer.values = keys.clone(), values.clone()
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
        quiet = row.on_piece is None and not settings.stop  # nobody reads the text before the end: decode it then
        if row.cancel.is_set():
            text = tok.decode(row.tokens, skip_special_tokens=True) if quiet else row.text
            return _Stream.finish(row, text, "cancelled")
        row.tokens.append(token)
        if quiet:
            if token not in stop_ids and len(row.tokens) < row.max_new:
                return False
            text = tok.decode(row.tokens, skip_special_tokens=True)
        else:
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
        if row.on_piece is None:
            return False
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
        if reason != "cancelled" and len(text) > row.sent and row.on_piece is not None:
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



def _stack(caches: list[DynamicCache | None], lengths: list[int], rows: list[int], config) -> DynamicCache:
    """One cache of the given caches' rows, each left-padded to the longest (None: `rows` rows of length 0)."""
    width = max(lengths)
    if len(caches) == 1 and lengths[0] == width:  # nothing to pad: share the layers (sliding-window ones too)
        return fork_cache(caches[0]) if caches[0] is not None else DynamicCache(config=config)
    stacked = DynamicCache(config=config)
    for k, layer in enumerate(stacked.layers):
        held = [c.layers[k] if c is not None and _holds(c.layers[k]) else None for c in caches]
        like = next((h for h in held if h is not None), None)
        if like is None:
            continue
        for name in ("keys", "values"):
            parts = [_pad_left(getattr(h, name) if h is not None else _empty(like, name, n), width - length, 2)
                     for h, length, n in zip(held, lengths, rows)]
            setattr(layer, name, parts[0] if len(parts) == 1 else torch.cat(parts))
        _initialise_like(layer, like)
    return stacked


def _pad_right(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    if n <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t, t.new_zeros(shape)], dim)


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
