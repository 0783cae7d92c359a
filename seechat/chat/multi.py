"""Batched generation over whole conversations, each with any number of pictures (several per message).

    from seechat.chat.multi import generate_conversations
    replies = generate_conversations(model, [([{"role": "user", "content": "<image>\\n<image>\\n第二张图里是什么？"}],
                                              [img1, img2])])

Each row is a list of {'role', 'content'} messages whose <image> markers stand for the row's images in
order (the same rule as training data and the API), rendered with the model's chat template and a
generation prompt. Rows are padded on the left and answered in one `generate` call, greedily unless the
settings say otherwise; the answers equal `generate_batch`'s for one-picture rows.
"""

from __future__ import annotations

import torch
from PIL import Image

from ..data.images import load_image
from ..model.seechat import SeeChat
from .batch import _reply, _room
from .engine import GenerationSettings, Reply, generation_config


def generate_conversations(model: SeeChat, rows: list[tuple[list[dict], list]],
                           settings: GenerationSettings | None = None, **kwargs) -> list[Reply]:
    """Answer the last user message of every (messages, images) row; one Reply per row, in order."""
    settings = settings or GenerationSettings(**kwargs)
    if not rows:
        return []
    ids_rows, pictures = [], []
    for messages, images in rows:
        pil = [im if isinstance(im, Image.Image) else load_image(im) for im in images]
        ids_rows.append(model.processor.render(messages, num_images=len(pil), add_generation_prompt=True).input_ids)
        pictures += pil  # in row order, each row's in marker order: the order embed() scatters them
    max_new = _room(model, ids_rows, settings)
    tok = model.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    if pad == model.image_token_id:
        pad = tok.eos_token_id
    width = max(len(r) for r in ids_rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in ids_rows], device=model.device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids_rows], device=model.device)
    vocab = model.llm.get_output_embeddings().weight.shape[0]
    with torch.no_grad():
        image_embeds = model.encode_images(model.processor.pixel_values(pictures).to(model.device)) if pictures else None
        embeds = model.embed(ids, image_embeds)
        prompt_ids = ids.masked_fill(ids == model.image_token_id, pad) if model.image_token_id >= vocab else ids
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        out = model.llm.generate(input_ids=prompt_ids, inputs_embeds=embeds, attention_mask=mask,
                                 generation_config=generation_config(model, settings, max_new, pad))
    new = out[:, width:].tolist()
    return [_reply(t, len(r), model.stop_token_ids, pad, tok, settings.stop) for t, r in zip(new, ids_rows)]
