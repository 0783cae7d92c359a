"""Batched generation: many single-turn questions, each about one image (or none), in one `generate` call.

    from seechat.chat.batch import generate_batch
    replies = generate_batch(model, [img1, img2], ["详细描述这张图片"] * 2, max_new_tokens=64)
    print([r.text for r in replies])

Each question is rendered exactly as the chat engine renders a fresh conversation (`<image>\\n` in front of
the text, the model's chat template, the generation prompt), the rows are padded on the left and prefilled
together with the image embeddings scattered in, and the engine's decode loop (decode.py) answers them, each
row with its own stop strings, repetition penalty over its own tokens and random generator. Greedy answers
equal the engine's one-by-one answers; a seeded row draws what the engine draws for it alone.

Context rule: the longest prompt plus the answer's room (max_new_tokens, at most a quarter of the context)
must fit the text expert's context, else ContextOverflowError; answers get at most context - longest prompt
tokens.
"""

from __future__ import annotations

import itertools

from collections import OrderedDict

import torch
from PIL import Image

from ..data.images import load_image
from ..data.processor import IMAGE, content
from ..errors import ContextOverflowError, SeeChatError
from ..model.seechat import SeeChat
from .decode import Batch, Row
from .engine import GenerationSettings, Reply, image_digest


def generate_batch(
    model: SeeChat,
    images: list,
    prompts: list[str] | str,
    settings: GenerationSettings | None = None,
    *,
    histories: list[list] | None = None,
    image_cache: "ImageCache | None" = None,
    **kwargs,
) -> list[Reply]:
    """Answer `prompts[i]` about `images[i]` (a path, bytes, a PIL image or None) for every i, in one batch.

    A single string prompt is asked about every image. `histories[i]`, when given, is a list of earlier
    [question, answer] pairs of row i's conversation (the image goes with its first question). Returns one
    Reply per row, in order. Each distinct image is encoded once per call, and once per `image_cache` across calls
    (an evaluation that asks several questions, or CircularEval rotations, about one picture).
    """
    settings = settings or GenerationSettings(**kwargs)
    if isinstance(prompts, str):
        prompts = [prompts] * len(images)
    if len(prompts) != len(images):
        raise SeeChatError(f"generate_batch got {len(images)} images but {len(prompts)} prompts: give one each")
    if not prompts:
        return []
    pil = [None if im is None else im if isinstance(im, Image.Image) else load_image(im) for im in images]
    histories = histories or [[] for _ in prompts]
    if len(histories) != len(prompts):
        raise SeeChatError(f"generate_batch got {len(prompts)} prompts but {len(histories)} histories")
    rows = [_render(model, text, im is not None, history) for text, im, history in zip(prompts, pil, histories)]
    max_new = _room(model, rows, settings)

    present = [im for im in pil if im is not None]
    with torch.no_grad():
        cache = image_cache if image_cache is not None else ImageCache()
        image_embeds = cache.encode(model, present).flatten(0, 1) if present else None
    prefix = _image_prefix(model, rows) if len(present) == len(rows) > 1 else 0
    if prefix:  # every prompt starts alike and holds its picture there: that start is prefilled once per picture
        digests = [image_digest(im) for im in pil]
        order = list(dict.fromkeys(digests))
        firsts = [digests.index(d) for d in order]
        per_row = image_embeds.reshape(len(rows), -1, image_embeds.shape[-1])
        return decode_together(model, rows, per_row[firsts], settings, max_new,
                               shared=(prefix, [order.index(d) for d in digests]))
    return decode_together(model, rows, image_embeds, settings, max_new)


def decode_together(model: SeeChat, rows: list[list[int]], image_embeds, settings: GenerationSettings,
                    max_new: int, shared: tuple[int, list[int]] | None = None) -> list[Reply]:
    """Answer fresh prompts (token ids, image embeddings in row order) in one batch of the engine's decode loop.
    `shared` = (prefix, picture of each row): the rows' first `prefix` ids are alike and hold their pictures, and
    image_embeds has one entry per distinct picture (Batch.fill_shared)."""
    replies = [Reply(prompt_tokens=len(r), prefill_tokens=len(r)) for r in rows]
    group = Batch(model, max_rows=len(rows)).capacity  # 1 for text experts with sliding-window layers
    todo = [Row(r, None, settings, max_new, reply) for r, reply in zip(rows, replies)]
    if shared is not None and group == len(rows):
        batch = Batch(model, max_rows=group)
        batch.fill_shared(todo, shared[0], shared[1], image_embeds)
        while batch.rows:
            batch.step()
        return replies
    if shared is not None:  # one entry per picture -> one per row, flat
        image_embeds = image_embeds[shared[1]].flatten(0, 1)
    per_row = [0] + list(itertools.accumulate(r.count(model.image_token_id) for r in rows))
    for start in range(0, len(rows), group):
        end = min(start + group, len(rows))
        batch = Batch(model, max_rows=group)
        batch.fill(todo[start:end], None if image_embeds is None else image_embeds[per_row[start] : per_row[end]])
        while batch.rows:
            batch.step()
    return replies


class ImageCache:
    """Image embeddings by content hash, the most recently used `max_images` kept."""

    def __init__(self, max_images: int = 64):
        self.max_images = max_images
        self.embeds: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.encoded = 0
        """How many images went through the vision expert."""

    def encode(self, model: SeeChat, images: list) -> torch.Tensor:
        """(n, num_image_tokens, hidden) for n PIL images; each image not already held is encoded once."""
        digests = [image_digest(im) for im in images]
        todo = {d: im for d, im in zip(digests, images) if d not in self.embeds}
        if todo:
            with torch.no_grad():
                new = model.encode_images(model.processor.pixel_values(list(todo.values())).to(model.device))
            self.encoded += len(todo)
            self.embeds.update(zip(todo, new))
        out = torch.stack([self.embeds[d] for d in digests])
        for d in digests:
            self.embeds.move_to_end(d)
        while len(self.embeds) > self.max_images:
            self.embeds.popitem(last=False)
        return out


# -- helpers ------------------------------------------------------------------------------------------
def _render(model: SeeChat, text: str, with_image: bool, history: list | None = None) -> list[int]:
    """The prompt ids of the conversation (history, then the question), as the chat engine renders it."""
    messages = []
    for question, answer in [*(history or []), (text, None)]:
        if "<image>" in question or (answer and "<image>" in answer):
            raise SeeChatError("the text may not contain '<image>': pass the image separately")
        first = not messages
        messages.append({"role": "user", "content": content([IMAGE, question] if with_image and first else [question])})
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
    return model.processor.render(messages, num_images=int(with_image), add_generation_prompt=True).input_ids


def _image_prefix(model: SeeChat, rows: list[list[int]]) -> int:
    """How many leading ids every row shares, when each row's image tokens all lie inside them and every row has
    more after them (0 otherwise): the start a batch can prefill once per picture."""
    shortest = min(len(r) for r in rows)
    n = 0
    while n < shortest - 1 and all(r[n] == rows[0][n] for r in rows):
        n += 1
    image = model.image_token_id
    inside = all(image not in r[n:] for r in rows) and image in rows[0][:n]
    return n if inside else 0


def _room(model: SeeChat, rows: list[list[int]], settings: GenerationSettings) -> int:
    limit = model.max_context
    longest = max(len(r) for r in rows)
    reserve = min(settings.max_new_tokens, max(1, limit // 4))
    if longest + reserve > limit:
        raise ContextOverflowError(
            f"a question with its image needs {longest} tokens plus {reserve} for the answer, over the text "
            f"expert's context of {limit}: shorten the prompt or lower max_new_tokens"
        )
    return min(settings.max_new_tokens, limit - longest)
