"""Turn conversations and images into model inputs: one render gives the token ids and the loss mask.

The marker rule (the same for training data, the chat engine and the HTTP API):
each `<image>` marker in a user message stands for the next image, in order; the number of markers
must equal the number of images. A marker becomes `image_start` + N image tokens + `image_end`, where
N is the bridge's token count and `{n}` in image_start / image_end the image's number in the conversation
(1, 2, ...: labels like Qwen-VL's "Picture 1:", so that 第二张 has something to point at). The chat template
(from the model directory) then renders the conversation, and its {% generation %} blocks mark the assistant
tokens that carry the loss.

Message text never becomes control tokens: a user (or a training record) who writes `<|im_end|>` or
`<|user|>` gets those characters as ordinary text, so nobody can forge a system or assistant turn. The
template's own control tokens, and the image tokens of the markers, are the only ones in the ids.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from transformers.utils.chat_template_utils import render_jinja_template

from ..errors import ConfigError, SeeChatError

IMAGE_MARKER = "<image>"
IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
_MARK, _END = "\ue000", "\ue001"
"""Private-use characters wrapped around control tokens found in message text (and removed from it first)."""


@dataclass
class Rendered:
    input_ids: list[int]
    labels: list[int] | None
    """input_ids on assistant tokens, IGNORE_INDEX elsewhere (None when not asked for)."""
    num_images: int


class SeeChatProcessor:
    """Tokenizer + image processor + the image-marker rule of one model."""

    def __init__(
        self,
        tokenizer,
        image_processor,
        *,
        image_token: str,
        num_image_tokens: int,
        image_start: str = "",
        image_end: str = "",
        system_prompt: str | None = None,
    ):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_token = image_token
        self.num_image_tokens = num_image_tokens
        self.image_start = image_start
        self.image_end = image_end
        self.system_prompt = system_prompt
        ids = tokenizer.convert_tokens_to_ids([image_token])
        if not ids or ids[0] is None or ids[0] == tokenizer.unk_token_id:
            raise ConfigError(f"the tokenizer has no token {image_token!r}; load the model with seechat.load()")
        self.image_token_id: int = ids[0]
        self._expanded = image_start + image_token * num_image_tokens + image_end
        self._numbered = "{n}" in image_start + image_end
        # every added token (the template's control tokens, the end token, the image token) but whitespace ones
        control = sorted((t for t in tokenizer.get_added_vocab() if t.strip()), key=len, reverse=True)
        self._control = re.compile("|".join(map(re.escape, control)) or "(?!)")
        self._marked = re.compile(f"{_MARK}({self._control.pattern}){_END}|[{_MARK}{_END}]")

    # -- text -----------------------------------------------------------------------------------------
    def render(
        self,
        messages: list[dict],
        *,
        num_images: int | None = None,
        add_generation_prompt: bool = False,
        with_labels: bool = False,
    ) -> Rendered:
        """Render `messages` ({'role', 'content'} dicts, content a string with <image> markers)."""
        markers = check_messages(messages, num_images)
        number = iter(range(1, markers + 1))
        msgs = [{"role": m["role"], "content": "".join(
                    (self._image(next(number)) if i else "") + self._mark(piece)
                    for i, piece in enumerate(m["content"].split(IMAGE_MARKER)))} for m in messages]
        if self.system_prompt and msgs and msgs[0]["role"] != "system":
            msgs.insert(0, {"role": "system", "content": self._mark(self.system_prompt)})
        template = self.tokenizer.chat_template or ""
        if with_labels and "generation" not in template:
            raise ConfigError(
                "the chat template has no {% generation %} block, so the training loss mask cannot be built: "
                "set llm.chat_template to a built-in template (chatml, gemma, glm4, llama3, seechat_v1)"
            )
        # What tokenizer.apply_chat_template does, except that marked control tokens are encoded as text.
        # (transformers' own `sanitize_control_tokens=True` cannot return the assistant mask the training loss
        # needs, and would also turn the image tokens seechat places inside message content into text.)
        texts, spans = render_jinja_template(
            [msgs], chat_template=template, return_assistant_tokens_mask=with_labels,
            add_generation_prompt=add_generation_prompt, **self.tokenizer.special_tokens_map,
        )
        ids, mask = self._encode(texts[0], spans[0] if with_labels else [])
        found = sum(1 for t in ids if t == self.image_token_id)
        if found != markers * self.num_image_tokens:
            raise SeeChatError(
                f"the rendered text has {found} image tokens, expected {markers} image(s) x {self.num_image_tokens}: "
                "the chat template must keep each message's text as it is"
            )
        labels = None
        if with_labels:
            labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
        return Rendered(ids, labels, markers)

    def _image(self, n: int) -> str:
        """What the n-th image of a conversation becomes (1-based)."""
        return self._expanded.replace("{n}", str(n)) if self._numbered else self._expanded

    def _mark(self, text: str) -> str:
        """Message text with each control token in it wrapped in private-use marks (encoded as text later)."""
        return self._control.sub(lambda m: _MARK + m.group(0) + _END, text.replace(_MARK, "").replace(_END, ""))

    def _encode(self, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[bool]]:
        """The ids of a rendered conversation and, per token, whether it lies in a {% generation %} span."""
        tok = self.tokenizer
        if _MARK not in text and _END not in text:  # the usual case: exactly what apply_chat_template gives
            enc = tok(text, add_special_tokens=False, return_offsets_mapping=bool(spans))
            offsets = enc["offset_mapping"] if spans else []
            return list(enc["input_ids"]), _in_spans(offsets, spans)
        # Pieces: text, marked token, text, ... (None for a lone mark); each piece also cut at the span edges so
        # that every piece lies wholly inside or outside the answer spans.
        cuts, pos = [], 0
        for i, piece in enumerate(self._marked.split(text)):
            if i % 2 == 0:
                cuts.append((pos, pos + len(piece), False))
                pos += len(piece)
            else:
                pos += 1  # the opening mark (or a lone mark)
                if piece is not None:
                    cuts.append((pos, pos + len(piece), True))
                    pos += len(piece) + 1
        edges = sorted({x for s, e in spans for x in (s, e)})
        ids: list[int] = []
        mask: list[bool] = []
        for start, end, as_text in cuts:
            bounds = [start, *(x for x in edges if start < x < end), end]
            for a, b in zip(bounds, bounds[1:]):
                piece = text[a:b]
                if not piece:
                    continue
                new = tok(piece, add_special_tokens=False, split_special_tokens=as_text)["input_ids"]
                if as_text and tok.convert_tokens_to_ids(piece) in new:  # an added token that is not "special"
                    new = [i for ch in piece for i in tok(ch, add_special_tokens=False)["input_ids"]]
                ids += new
                mask += [any(s <= a < e for s, e in spans)] * len(new)
        return ids, mask

    # -- images ---------------------------------------------------------------------------------------
    def pixel_values(self, images: list) -> torch.Tensor:
        """Preprocess PIL images into a (n, 3, H, W) float tensor."""
        return self.image_processor(images=images, return_tensors="pt")["pixel_values"]


def _in_spans(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """Per token (its character offsets, in text order), whether it overlaps a span: one pass over both (asking
    every span for every token was 11% of encoding a toy-world Stage II sample)."""
    spans, k, out = sorted(spans), 0, []
    for a, b in offsets:
        while k < len(spans) and spans[k][1] <= a:  # spans ending before this token cannot reach later ones
            k += 1
        out.append(k < len(spans) and b > spans[k][0])
    return out


IMAGE = None
"""An image's place among a message's parts (see content)."""


def content(parts: list) -> str:
    """A message's content from its parts in order: text, or IMAGE for an image (the one marker rule everywhere).

    Parts are joined with newlines, so [IMAGE, "question"] is "<image>\\nquestion": how the terminal, the web page,
    the API (OpenAI content parts), batched generation and training records all attach images.
    """
    return "\n".join(IMAGE_MARKER if p is IMAGE else p for p in parts)


def check_messages(messages: list[dict], num_images: int | None = None) -> int:
    """Validate roles and contents; return the number of <image> markers (which must equal num_images)."""
    if not isinstance(messages, list) or not messages:
        raise SeeChatError("a conversation needs at least one message")
    markers = 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise SeeChatError(
                f"message {i} must be {{'role': one of {list(ROLES)}, 'content': a string}}, got {str(m)[:80]!r}"
            )
        count = m["content"].count(IMAGE_MARKER)
        if count and m["role"] != "user":
            raise SeeChatError(f"message {i} ({m['role']}) has an <image> marker; images belong in user messages")
        markers += count
    if num_images is not None and markers != num_images:
        raise SeeChatError(
            f"the conversation has {markers} <image> marker(s) but {num_images} image(s): "
            "put exactly one <image> in a user message for each image, in order"
        )
    return markers
