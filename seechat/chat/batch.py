"""Batched generation: many single-turn questions, each about one image (or none), in one `generate` call.

    from seechat.chat.batch import generate_batch
    replies = generate_batch(model, [img1, img2], ["详细描述这张图片"] * 2, max_new_tokens=64)
    print([r.text for r in replies])

Each question is rendered exactly as the chat engine renders a fresh conversation (`<image>\\n` in front of
the text, the model's chat template, the generation prompt), the rows are padded on the left, the image
embeddings are scattered in, and the text expert's stock `generate` runs on `inputs_embeds` with the prompt
ids alongside (so repetition_penalty sees the prompt, as in the engine). Greedy answers equal the engine's
one-by-one answers; with sampling, a batch draws from one seeded stream, so its answers differ from the
engine's one-by-one samples.

Context rule: the longest prompt plus the answer's room (max_new_tokens, at most a quarter of the context)
must fit the text expert's context, else ContextOverflowError; answers get at most context - longest prompt
tokens.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from PIL import Image

from ..data.images import load_image
from ..data.processor import IMAGE, content
from ..errors import ContextOverflowError, SeeChatError
from ..model.seechat import SeeChat
from .decode import find_stop
from .engine import GenerationSettings, Reply, generation_config, image_digest


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

    tok = model.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    if pad == model.image_token_id:  # padding must not look like an image position
        pad = tok.eos_token_id
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=model.device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=model.device)
    present = [im for im in pil if im is not None]
    with torch.no_grad():
        cache = image_cache if image_cache is not None else ImageCache()
        image_embeds = cache.encode(model, present) if present else None
        embeds = model.embed(ids, image_embeds)
        config = generation_config(model, settings, max_new, pad)
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        out = model.llm.generate(
            # the ids go along for the logits processors (repetition_penalty)
            input_ids=ids, inputs_embeds=embeds, attention_mask=mask, generation_config=config,
            tokenizer=tok,  # for the stop strings
        )
    new = out[:, width:].tolist()
    return [_reply(tokens, len(row), model.stop_token_ids, pad, tok, settings.stop) for tokens, row in zip(new, rows)]


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


def _reply(tokens: list[int], prompt_len: int, stop_ids: list[int], pad: int, tok, stop: list[str]) -> Reply:
    """Cut a row at its first end token (kept in token_ids, as the engine does) and at its first stop string."""
    end = next((i for i, t in enumerate(tokens) if t in stop_ids), None)
    kept = tokens if end is None else tokens[: end + 1]
    if end is None and stop:  # a row a stop string finished early was filled up with padding
        while kept and kept[-1] == pad:
            kept = kept[:-1]
    text = tok.decode(kept, skip_special_tokens=True)
    cut = find_stop(text, stop)
    if cut is not None:
        text, finish = text[:cut], "stop"
    else:
        finish = "stop" if end is not None else "length"
    return Reply(text=text, token_ids=kept, finish_reason=finish, prompt_tokens=prompt_len,
                 completion_tokens=len(kept), prefill_tokens=prompt_len)
