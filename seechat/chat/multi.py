"""Batched generation over whole conversations, each with any number of pictures (several per message).

    from seechat.chat.multi import generate_conversations
    replies = generate_conversations(model, [([{"role": "user", "content": "<image>\\n<image>\\n第二张图里是什么？"}],
                                              [img1, img2])])

Each row is a list of {'role', 'content'} messages whose <image> markers stand for the row's images in
order (the same rule as training data and the API), rendered with the model's chat template and a
generation prompt. Rows are padded on the left, prefilled together and answered by the engine's decode loop,
greedily unless the settings say otherwise; the answers equal `generate_batch`'s for one-picture rows.
"""

from __future__ import annotations

import torch
from PIL import Image

from ..data.images import load_image
from ..model.seechat import SeeChat
from .batch import _room, decode_together
from .engine import GenerationSettings, Reply


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
    with torch.no_grad():
        pixels = model.processor.pixel_values(pictures).to(model.device) if pictures else None
        image_embeds = model.encode_images(pixels) if pictures else None
    return decode_together(model, ids_rows, image_embeds, settings, max_new)
