"""One chat engine behind every front end (terminal, web page, HTTP API).

The engine knows nothing about terminals or HTTP. It renders a conversation with the model's chat
template, encodes each image once per conversation, keeps the KV cache between turns so a turn
prefills only its new text, and streams the answer from the decode loop in decode.py (the one `seechat serve`
runs several answers through at once).

    engine = ChatEngine(seechat.load("runs/toyworld/model"))
    conv = engine.conversation()
    print(conv.ask("这是什么形状？", image="test.png"))
    for piece in conv.stream("它是什么颜色？"):
        print(piece, end="", flush=True)

Prefix cache (`prefix_cache_bytes` > 0, what `seechat serve` uses): the KV caches of finished turns are kept,
least recently used first out past the byte budget, keyed by token ids and image content hashes, so a client
that re-sends its history (as every OpenAI client does) prefills only the new part; `Reply.cached_tokens` says
how many prompt tokens came from a cache.

Context rule: when the prompt plus the room kept for the answer (max_new_tokens, at most a quarter of the
context) does not fit, whole exchanges (a user message and its answer) are dropped, oldest first. The
exchange that carries the newest image is dropped last, and never while it belongs to the current
question; if the current question with its image still does not fit, ContextOverflowError is raised.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from PIL import Image
from transformers import DynamicCache

from ..data.images import load_image
from ..data.processor import IMAGE, IMAGE_MARKER, check_messages, content
from ..errors import ConfigError, ContextOverflowError, SeeChatError
from ..model.seechat import SeeChat
from .decode import Batch, Row, fork_cache


MIN_REUSE = 16
"""Fewest prompt positions worth taking from a cache (unless the cache holds the whole prompt): requests about
different pictures share only the chat template's first few tokens, and a row that brings a cache of its own
cannot take the batched prefill's fast path (vLLM reuses whole blocks of 16 for a like reason)."""


@dataclass
class GenerationSettings:
    """How an answer is generated. temperature 0 means greedy decoding (the original's default)."""

    max_new_tokens: int = 512
    """Most tokens in one answer."""
    temperature: float = 0.0
    """0 for greedy; above 0 samples with this temperature."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    top_k: int = 0
    """Sample only among the k most likely tokens (0: no limit)."""
    repetition_penalty: float = 1.0
    """Above 1 discourages repeating tokens."""
    seed: int | None = None
    """Seed for sampling, for repeatable answers."""
    stop: list[str] = field(default_factory=list)
    """Extra strings that end the answer (not included in it)."""

    def __post_init__(self) -> None:
        checks = [
            (self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
            (self.temperature >= 0, "temperature must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (all(isinstance(s, str) and s for s in self.stop), "stop must be a list of non-empty strings"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


@dataclass
class Reply:
    """What one turn produced, with the numbers front ends show."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    """The generated tokens (the end token included when one ended the answer)."""
    finish_reason: str = "stop"
    """'stop' (end token or stop string), 'length' (max_new_tokens) or 'cancelled'."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prefill_tokens: int = 0
    """Prompt tokens computed this turn; the rest came from the KV cache of earlier turns."""
    cached_tokens: int = 0
    """prompt_tokens - prefill_tokens: the prompt tokens whose keys and values came from a cache."""
    dropped_messages: int = 0
    seconds: float = 0.0


@dataclass
class _KV:
    """A KV cache and the key of each position it holds (see prefix_keys)."""

    cache: DynamicCache | None = None
    keys: list = field(default_factory=list)


@dataclass
class _Image:
    image: Image.Image
    embeds: torch.Tensor | None = None
    digest: str = ""
    """A hash of the image's content: the identity of its positions in a KV cache key."""

    def __post_init__(self) -> None:
        if not self.digest:
            self.digest = image_digest(self.image)


class ChatEngine:
    """Generation over one loaded model; thread-safe (turns run one at a time)."""

    def __init__(self, model: SeeChat, *, reuse_cache: bool = True, prefix_cache_bytes: int = 0):
        self.model = model.eval()
        self.reuse_cache = reuse_cache
        self.prefix_cache = PrefixCache(prefix_cache_bytes) if reuse_cache and prefix_cache_bytes > 0 else None
        self.lock = threading.Lock()
        self.runner = None
        """Where conversations send their turns when set (the web page's Scheduler: tabs decode together);
        None runs each turn on the caller's thread with `stream_chat`."""

    # -- conveniences ---------------------------------------------------------------------------------
    def conversation(self) -> "Conversation":
        return Conversation(self)

    def ask(self, image=None, text: str | None = None, **settings) -> str:
        """One question about one image (or none), in a fresh conversation."""
        return self.conversation().ask(text or self.model.config.default_prompt, image=image, **settings)

    # -- the core -------------------------------------------------------------------------------------
    def stream_chat(
        self,
        state: "ChatState",
        settings: GenerationSettings | None = None,
        *,
        reply: Reply | None = None,
        cancel: threading.Event | None = None,
    ) -> Iterator[str]:
        """Stream the answer to the conversation in `state`, whose last message is the user's question.

        `state.messages` are {'role', 'content'} dicts with one <image> marker per entry of `state.images`.
        When the turn completes, `state` holds what was kept (see the context rule) plus the answer, and the KV
        cache for the next turn; `reply` is filled in. A turn that fails, is cancelled or is abandoned by its
        consumer leaves `state` exactly as it was: the turn works on a fork of the cache (the layers' tensors are
        shared, never written in place) and stores its results back only on success. Decoding runs on the
        caller's thread, one step per piece of text (see decode.py); `seechat serve` runs the same rows together.
        """
        pieces: list[str] = []
        with self.lock:
            batch = Batch(self.model)
            batch.join([self.begin(state, settings, reply=reply, cancel=cancel, on_piece=pieces.append)])
            while True:
                if pieces:
                    yield "".join(pieces)
                    pieces.clear()
                if not batch.rows:
                    break
                batch.step()

    def begin(
        self,
        state: "ChatState",
        settings: GenerationSettings | None = None,
        *,
        reply: Reply | None = None,
        cancel: threading.Event | None = None,
        on_piece=None,
        on_finish=lambda row: None,
        encode: bool = True,
    ) -> Row:
        """The turn in `state` as a Row ready to join a decode Batch (Batch.join prefills it): the context rule
        applied, the KV cache of the conversation or the prefix cache reused as far as its keys agree, the new
        images encoded (with `encode=False` not yet: `encode(rows)` then encodes the images of several rows in one
        call). Call it, and join and step the batch, under `self.lock`. When the row finishes (not cancelled),
        `state` gets the kept messages, the answer and the KV cache, and the prefix cache gets the KV; then
        `on_finish(row)` is called.
        """
        settings = settings or GenerationSettings()
        reply = reply if reply is not None else Reply()
        start = time.perf_counter()
        ids, max_new, messages, images = self._fit(state, settings, reply)
        keys = prefix_keys(ids, self.model.image_token_id, self.model.num_image_tokens, [e.digest for e in images])
        source = state.kv
        if self.prefix_cache is not None:
            found = self.prefix_cache.lookup(keys)
            if found is not None and _common_prefix(found.keys, keys) > _common_prefix(source.keys, keys):
                source = found
        cache, cached, inputs = self._reuse(ids, keys, images, source)
        reply.prompt_tokens, reply.prefill_tokens, reply.cached_tokens = len(ids), len(ids) - cached, cached

        def finished(row: Row, kv_cache: DynamicCache | None) -> None:
            reply.seconds = time.perf_counter() - start
            if reply.finish_reason != "cancelled":
                kv = _KV()
                if kv_cache is not None:
                    kv = _KV(kv_cache, (keys + row.tokens)[: kv_cache.get_seq_length()])
                    if self.prefix_cache is not None:
                        self.prefix_cache.store(kv)
                state.messages[:] = [*messages, {"role": "assistant", "content": reply.text}]
                state.images[:] = images
                state.kv = kv
            on_finish(row)

        row = Row(ids, cache, settings, max_new, reply, cancel or threading.Event(), on_piece, finished,
                  keep_cache=self.reuse_cache, inputs=inputs)
        if encode:
            self.encode([row])
        return row

    def encode(self, rows: list[Row]) -> None:
        """Give each row begun with `encode=False` its `todo` embeddings: the images they still need go through
        the vision expert together, each once."""
        rows = [r for r in rows if r.todo is None and r.inputs is not None]
        self._encode_images(list({id(e): e for r in rows for e in r.inputs[1]}.values()))
        with torch.no_grad():
            for row in rows:
                todo, entries, skip, here = row.inputs
                part = torch.cat([e.embeds for e in entries])[skip : skip + here] if here else None
                part = None if part is None else part.to(self.model.device)
                row.todo, row.inputs = self.model.embed(todo, part), None

    def _fit(self, state: "ChatState", settings: GenerationSettings, reply: Reply):
        """Drop the oldest exchanges until the prompt and the answer's room fit (the rule in the module docstring).

        Returns the prompt ids, the answer's room, and the kept messages and images (`state` is not changed).
        The fewest exchanges to drop are found by bisection, so a long history costs a few renders, not one per
        exchange (a request with thousands of messages must not hold the engine for minutes).
        """
        proc, limit = self.model.processor, self.model.max_context
        check_messages(state.messages, len(state.images))
        if state.messages[-1]["role"] != "user":
            raise SeeChatError("the last message must be the user's question")
        reserve = min(settings.max_new_tokens, max(1, limit // 4))
        spans = _droppable(state.messages)

        def render(k: int) -> list[int]:
            kept = _without(state.messages, spans[:k])
            return proc.render(kept, num_images=_count_markers(kept), add_generation_prompt=True).input_ids

        ids, k = render(0), 0
        if len(ids) + reserve > limit:
            ids, k = render(len(spans)), len(spans)
            if len(ids) + reserve > limit:
                with_image = _count_markers(_without(state.messages, spans)) > 0
                raise ContextOverflowError(
                    f"the question{' with its image' if with_image else ''} needs {len(ids)} tokens plus "
                    f"{reserve} for the answer, over the text expert's context of {limit}: shorten the question, "
                    "lower max_new_tokens or start a new conversation"
                )
            lo = 1  # the fewest drops that fit lie in [lo, k]
            while lo < k:
                mid = (lo + k) // 2
                trial = render(mid)
                if len(trial) + reserve <= limit:
                    ids, k = trial, mid
                else:
                    lo = mid + 1
        messages, images = list(state.messages), list(state.images)
        for start, end in reversed(spans[:k]):  # newest first, so earlier indices stay valid
            first_image = _count_markers(messages[:start])
            del images[first_image : first_image + _count_markers(messages[start:end])]
            del messages[start:end]
            reply.dropped_messages += end - start
        return ids, min(settings.max_new_tokens, limit - len(ids)), messages, images

    def _encode_images(self, entries: list[_Image]) -> None:
        """Encode the entries that have no embeddings yet, in one call of the vision expert; each is kept."""
        todo = [e for e in entries if e.embeds is None]
        if todo:
            pixels = self.model.processor.pixel_values([e.image for e in todo]).to(self.model.device)
            with torch.no_grad():
                embeds = self.model.encode_images(pixels)
            for e, emb in zip(todo, embeds):
                e.embeds = emb

    def _reuse(self, ids: list[int], keys: list, images: list[_Image], kv: _KV):
        """The cache of the prompt's first positions that `kv` holds, how many they are, and what the rest needs:
        (their ids, the images with positions among them, how many of the first one's positions are cached,
        how many image positions there are).

        Reuse runs as far as the keys agree: token ids, and for image positions the image's content hash, so a
        slot that now holds another image is computed again. The cache in `kv` is forked, never changed; at least
        the last prompt token is left to compute (its logits give the first answer token).
        """
        reused, cache = 0, None
        if self.reuse_cache and kv.cache is not None:
            reused = min(_common_prefix(kv.keys, keys), len(ids) - 1, kv.cache.get_seq_length())
            if reused < min(MIN_REUSE, len(ids) - 1):  # a few template tokens: not worth a copy of the cache
                reused = 0
            if reused > 0:
                cache = fork_cache(kv.cache)
                cache.crop(reused - cache.get_seq_length())  # a negative count removes that many tokens
        todo = torch.tensor([ids[reused:]], device=self.model.device)
        # only the images with positions left to compute are encoded (a cached image is not looked at again)
        before = sum(1 for t in ids[:reused] if t == self.model.image_token_id)
        here = int((todo == self.model.image_token_id).sum())
        first, skip = divmod(before, self.model.num_image_tokens)
        return cache, reused, (todo, images[first:] if here else [], skip, here)


class PrefixCache:
    """KV caches of finished turns, looked up by the longest common key prefix; least recently used out first.

    Bytes are counted per entry (keys and values of every layer); entries that share tensors (a conversation's
    later turn extends its earlier one) are counted twice, so the budget is an upper bound.

    Found through a chain of block hashes (the keys of positions 0-15, then 0-31, ..., as vLLM keys its prefix
    blocks): a lookup walks its own chain to the deepest block some entry shares and compares keys with those
    entries only, so it costs the prompt's length, not the number of entries (thousands for a small model).
    Hand-written: no library keeps a prefix index over transformers caches.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[int, tuple[_KV, int]] = OrderedDict()
        self.bytes = 0
        self._next = 0
        self._blocks: dict[int, set[int]] = {}  # block-chain hash -> entries whose keys start with that prefix
        self._chains: dict[int, list[int]] = {}  # entry -> its chain
        self._ends: dict[int, set[int]] = {}  # the last hash of an entry's chain -> those entries

    def lookup(self, keys: list) -> _KV | None:
        found: set[int] = set()
        for h in _chain(keys):
            if h not in self._blocks:
                break
            found = self._blocks[h]
        best, length = None, 0
        for key in found:
            n = _common_prefix(self.entries[key][0].keys, keys)
            if n > length:
                best, length = key, n
        if best is None:
            return None
        self.entries.move_to_end(best)
        return self.entries[best][0]

    def store(self, kv: _KV) -> None:
        if kv.cache is None or not kv.keys:
            return
        chain = _chain(kv.keys)
        if not chain:  # shorter than a block: never worth reusing (MIN_REUSE)
            return
        # an entry this one extends is no longer needed: its chain is a prefix of this one's
        for key in [k for h in chain for k in self._ends.get(h, ())]:
            old = self.entries[key][0]
            if len(old.keys) <= len(kv.keys) and old.keys == kv.keys[: len(old.keys)]:
                self._drop(key)
        size = sum(t.numel() * t.element_size() for layer in kv.cache.layers if layer.is_initialized
                   for t in (layer.keys, layer.values))
        if size > self.max_bytes:
            return
        key, self._next = self._next, self._next + 1
        self.entries[key] = (kv, size)
        self.bytes += size
        self._chains[key] = chain
        self._ends.setdefault(chain[-1], set()).add(key)
        for h in chain:
            self._blocks.setdefault(h, set()).add(key)
        while self.bytes > self.max_bytes:
            self._drop(next(iter(self.entries)))

    def _drop(self, key: int) -> None:
        _, size = self.entries.pop(key)
        self.bytes -= size
        chain = self._chains.pop(key)
        self._ends[chain[-1]].discard(key)
        if not self._ends[chain[-1]]:
            del self._ends[chain[-1]]
        for h in chain:
            held = self._blocks[h]
            held.discard(key)
            if not held:
                del self._blocks[h]


PREFIX_BLOCK = MIN_REUSE  # a match shorter than one block is not reused anyway


def _chain(keys: list) -> list[int]:
    """Hashes of keys[:16], keys[:32], ... (whole blocks only), each from the one before and its block."""
    chain, h = [], 0
    for start in range(0, len(keys) - PREFIX_BLOCK + 1, PREFIX_BLOCK):
        h = hash((h, tuple(keys[start : start + PREFIX_BLOCK])))
        chain.append(h)
    return chain


@dataclass
class ChatState:
    """Messages, their images (each encoded once) and the KV cache of one conversation."""

    messages: list[dict] = field(default_factory=list)
    images: list[_Image] = field(default_factory=list)
    kv: _KV = field(default_factory=_KV)

    @classmethod
    def of(cls, messages: list[dict], images: list) -> "ChatState":
        return cls([dict(m) for m in messages], [im if isinstance(im, _Image) else _Image(im) for im in images])


class Conversation:
    """A multi-turn chat over one engine: history, images and the KV cache between turns."""

    def __init__(self, engine: ChatEngine):
        self.engine = engine
        self.state = ChatState()
        self.last_reply: Reply | None = None

    @property
    def messages(self) -> list[dict]:
        return self.state.messages

    def reset(self) -> None:
        """Forget the history, its images and the KV cache."""
        self.state = ChatState()

    def stream(self, text: str, image=None, settings: GenerationSettings | None = None, **kwargs) -> Iterator[str]:
        """Stream the answer to `text`, optionally about a new image (a path, bytes or a PIL image)."""
        if IMAGE_MARKER in text:
            raise SeeChatError(f"the text may not contain {IMAGE_MARKER!r}: pass the image with image=...")
        settings = settings or GenerationSettings(**kwargs)
        entry = None if image is None else _Image(image if isinstance(image, Image.Image) else load_image(image))
        turn = ChatState(list(self.state.messages), list(self.state.images), self.state.kv)
        turn.messages.append({"role": "user", "content": content([IMAGE, text] if entry else [text])})
        if entry:
            turn.images.append(entry)
        reply = Reply()
        runner = self.engine.runner
        if runner is not None:
            yield from runner.stream(turn, settings, reply)
        else:
            yield from self.engine.stream_chat(turn, settings, reply=reply)
        if reply.finish_reason != "cancelled":  # a failed, cancelled or abandoned turn leaves the state as it was
            self.state = turn
        self.last_reply = reply

    def ask(self, text: str, image=None, settings: GenerationSettings | None = None, **kwargs) -> str:
        """The whole answer to `text` (see stream)."""
        for _ in self.stream(text, image=image, settings=settings, **kwargs):
            pass
        return self.last_reply.text


# -- helpers ------------------------------------------------------------------------------------------
def image_digest(image: Image.Image) -> str:
    """A hash of an image's content (mode, size and pixels): equal images share KV cache positions, others never."""
    h = hashlib.sha256(f"{image.mode}:{image.size}:".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def prefix_keys(ids: list[int], image_token_id: int, per_image: int, digests: list[str]) -> list:
    """The KV cache key of each position: its token id, or for an image position (image digest, index in the image).

    Every image slot holds the same placeholder id, so a match on ids alone would reuse one image's keys and
    values for another (SGLang and vLLM mix a hash of the image into their cache keys for the same reason).
    """
    keys: list = list(ids)
    seen = 0
    for i, t in enumerate(ids):
        if t == image_token_id:
            image = seen // per_image
            keys[i] = (digests[image] if image < len(digests) else None, seen % per_image)
            seen += 1
    return keys


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _droppable(messages: list[dict]) -> list[tuple[int, int]]:
    """(start, end) of the exchanges that may be dropped, oldest first.

    An exchange is a user message and the answers after it. The current question (the last user
    message) is never dropped, nor the exchange that carries the newest image.
    """
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    with_image = [i for i in users if IMAGE_MARKER in messages[i]["content"]]
    keep = {users[-1], with_image[-1] if with_image else None}
    return [(start, users[k + 1]) for k, start in enumerate(users[:-1]) if start not in keep]


def _without(messages: list[dict], spans: list[tuple[int, int]]) -> list[dict]:
    drop = {i for start, end in spans for i in range(start, end)}
    return [m for i, m in enumerate(messages) if i not in drop]


def _count_markers(messages: list[dict]) -> int:
    return sum(m["content"].count(IMAGE_MARKER) for m in messages)
