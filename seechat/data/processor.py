"""Turn conversations and images into model inputs: one render gives the token ids and the loss mask.

The marker rule (the same for training data, the chat engine and the HTTP API):
each `<image>` marker in a user message stands for the next image, in order; the number of markers
must equal the number of images. A marker becomes `image_start` + N image tokens + `image_end`, where
N is the bridge's token count. The chat template (from the model directory) then renders the
conversation, and its {% generation %} blocks mark the assistant tokens that carry the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError, SeeChatError

IMAGE_MARKER = "<image>"
IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")


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
        msgs = [{"role": m["role"], "content": m["content"].replace(IMAGE_MARKER, self._expanded)} for m in messages]
        if self.system_prompt and msgs and msgs[0]["role"] != "system":
            msgs.insert(0, {"role": "system", "content": self.system_prompt})
        template = self.tokenizer.chat_template or ""
        if with_labels and "generation" not in template:
            raise ConfigError(
                "the chat template has no {% generation %} block, so the training loss mask cannot be built: "
                "set llm.chat_template to a built-in template (chatml, glm4, llama3, seechat_v1)"
            )
        out = self.tokenizer.apply_chat_template(
            msgs,
            tokenize=True,
            return_dict=True,
            add_generation_prompt=add_generation_prompt,
            return_assistant_tokens_mask=with_labels,
        )
        ids = list(out["input_ids"])
        found = sum(1 for t in ids if t == self.image_token_id)
        if found != markers * self.num_image_tokens:
            raise SeeChatError(
                f"the rendered text has {found} image tokens, expected {markers} image(s) x {self.num_image_tokens}; "
                f"do not write the image token {self.image_token!r} in the text except as the <image> marker"
            )
        labels = None
        if with_labels:
            labels = [t if m else IGNORE_INDEX for t, m in zip(ids, out["assistant_masks"])]
        return Rendered(ids, labels, markers)

    # -- images ---------------------------------------------------------------------------------------
    def pixel_values(self, images: list) -> torch.Tensor:
        """Preprocess PIL images into a (n, 3, H, W) float tensor."""
        return self.image_processor(images=images, return_tensors="pt")["pixel_values"]


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
