"""The toy world's tiny experts, trained by seechat's own code and saved in Hugging Face format.

- vision: a CLIPModel (vision + text towers) trained contrastively on the world's image-caption pairs.
  The whole CLIPModel is saved, so `seechat` loads its vision tower by the same code path as a real CLIP,
  and its text tower can score image-caption relevance for the win-rate evaluation.
- llm: a GLM-architecture causal LM (in honour of the original's ChatGLM) with a per-character Chinese
  tokenizer and the glm4 chat template, pretrained on the world's text (descriptions and conversations
  in which the description stands where the picture will later be).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..tiny import train_tokenizer
from . import world


@dataclass
class ExpertSizes:
    vision_hidden: int = 128
    vision_layers: int = 4
    patch_size: int = 16
    """16: a 4x4 grid of patches; 8: an 8x8 grid, which the bridge reads 2x2-pooled (the same 16 tokens)."""
    text_hidden: int = 96
    llm_hidden: int = 128
    llm_layers: int = 3


def make_tokenizers(texts: list[str]):
    """The text expert's tokenizer (glm4 template, <image> token) and CLIP's twin that appends an end token."""
    from tokenizers.processors import TemplateProcessing

    tok = train_tokenizer(texts, vocab_size=1000, template="glm4")
    tok.padding_side = "right"
    clip_tok = train_tokenizer(texts, vocab_size=1000, template="glm4")
    eos = clip_tok.convert_tokens_to_ids("<|endoftext|>")
    # CLIP pools its text tower at the end token, so every encoded text must end with it.
    clip_tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="$A <|endoftext|>", special_tokens=[("<|endoftext|>", eos)]
    )
    clip_tok.model_max_length = 32
    return tok, clip_tok


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def text_views(colour: str, kind: str, position: str) -> list[tuple[str, tuple]]:
    """Descriptions of one picture at several levels of detail, each with the attributes it names.

    Besides whole captions the vision expert also learns to match partial ones ("红色。", "在左上角。"),
    which makes it pick up each attribute on its own, and quickly.
    """
    return [
        (f"一个{colour}的{kind}在{position}。", (colour, kind, position)),
        (f"一个{colour}的{kind}。", (colour, kind, None)),
        (f"{colour}。", (colour, None, None)),
        (f"{kind}。", (None, kind, None)),
        (f"在{position}。", (None, None, position)),
    ]


def train_clip(out: Path, pixels: torch.Tensor, attributes: list[tuple[str, str, str]], tokenizer, *,
               sizes: ExpertSizes, steps: int, batch: int, seed: int, lr: float = 1e-3, image_processor=None,
               full_caption_share: float = 0.5, position_std: float = 0.5) -> list[float]:
    """Contrastive training of a CLIPModel on (picture, description) pairs; saves it with its tokenizer.

    Each picture in a batch is paired with its whole caption (half the time) or a partial description;
    every picture a description fits counts as a match for it (several per row and column).
    """
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=sizes.text_hidden, intermediate_size=sizes.text_hidden * 4,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=32,
                         eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, bos_token_id=eos),
        vision_config=dict(hidden_size=sizes.vision_hidden, intermediate_size=sizes.vision_hidden * 4,
                           num_hidden_layers=sizes.vision_layers, num_attention_heads=4,
                           image_size=world.IMAGE_SIZE, patch_size=sizes.patch_size),
        projection_dim=64,
    )
    model = CLIPModel(config)
    with torch.no_grad():
        # Hugging Face initialises position embeddings at std 0.02, far below the patch embeddings, so where
        # a shape sits is nearly invisible at first and position is learned last; start them comparable.
        emb = model.vision_model.embeddings
        emb.position_embedding.weight.normal_(std=position_std)
    views = {}
    for colour in world.COLOURS:
        for kind in world.SHAPES:
            for position in world.POSITIONS:
                for text, named in text_views(colour, kind, position):
                    views[text] = named
    texts = sorted(views)
    named = [views[t] for t in texts]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    image_attrs = list(attributes)
    view_index = {t: i for i, t in enumerate(texts)}
    per_image = [[view_index[t] for t, _ in text_views(*a)] for a in image_attrs]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, steps, max(1, steps // 10)))
    gen = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for _ in tqdm(range(steps), desc="vision expert (CLIP)", unit="step", leave=False):
        pick = torch.randint(0, len(image_attrs), (batch,), generator=gen).tolist()
        full = torch.rand(batch, generator=gen) < full_caption_share
        choice = torch.randint(1, 5, (batch,), generator=gen).tolist()
        ids = [per_image[i][0 if f else c] for i, f, c in zip(pick, full.tolist(), choice)]
        out_ = model(input_ids=enc.input_ids[ids], attention_mask=enc.attention_mask[ids], pixel_values=pixels[pick])
        logits = out_.logits_per_image
        fits = torch.tensor([[all(n is None or n == a for n, a in zip(named[t], image_attrs[i])) for t in ids]
                             for i in pick], dtype=torch.float)
        loss = (F.cross_entropy(logits, fits / fits.sum(1, keepdim=True))
                + F.cross_entropy(logits.t(), fits.t() / fits.t().sum(1, keepdim=True))) / 2
        step(loss, opt, sched, model.parameters(), losses)
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if image_processor is not None:
        image_processor.save_pretrained(out)
    return losses


def lm_texts(scenes: list[world.Scene], tokenizer, seed: int) -> list[str]:
    """Chat-formatted text: the description stands where the image will be, then questions about it."""
    rng = random.Random(f"lm:{seed}")
    texts = []
    for scene in scenes:
        convo = world.conversation(scene, rng)
        messages = [{"role": "user" if t["from"] == "human" else "assistant",
                     "content": t["value"].replace("<image>\n", scene.caption())} for t in convo]
        texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
    return texts


def new_llm(tokenizer, sizes: ExpertSizes, max_positions: int):
    """A freshly initialised GLM-architecture causal LM of `sizes` over `tokenizer` (pad/eos/bos in its vocabulary)."""
    from transformers import GlmConfig, GlmForCausalLM

    ids = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
           "bos_token_id": tokenizer.convert_tokens_to_ids("<sop>")}
    config = GlmConfig(vocab_size=len(tokenizer), hidden_size=sizes.llm_hidden, intermediate_size=sizes.llm_hidden * 3,
                       num_hidden_layers=sizes.llm_layers, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=sizes.llm_hidden // 4, max_position_embeddings=max_positions, tie_word_embeddings=False,
                       **ids)
    return GlmForCausalLM(config)


def step(loss: torch.Tensor, opt, sched, params, losses: list[float], bar=None, **shown: float) -> None:
    """One optimiser step on `loss` (gradients clipped to norm 1), its value appended to `losses` and shown on `bar`."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    losses.append(loss.item())
    if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", **{k: f"{v:.2f}" for k, v in shown.items()})


def save_llm(model, tokenizer, out: Path) -> None:
    """Save a trained text expert with its tokenizer; generation stops at the end token or the next user turn."""
    model.eval()
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|user|>")]
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def train_llm(out: Path, texts: list[str], tokenizer, *, sizes: ExpertSizes, steps: int, batch: int, seed: int,
              lr: float = 3e-3, max_positions: int = 512, progress=None) -> list[float]:
    """Causal-LM pretraining of a GLM-architecture model on the world's text; saves it with its tokenizer.
    `progress`: a tqdm bar to advance (one of its own otherwise); toy world v2 passes one it made earlier."""
    torch.manual_seed(seed)
    model = new_llm(tokenizer, sizes, max_positions)
    enc = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, steps, max(1, steps // 20)))
    gen = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    bar = tqdm(total=steps, desc="text expert (GLM)", unit="step", leave=False) if progress is None else progress
    for _ in range(steps):
        pick = torch.randint(0, len(texts), (batch,), generator=gen)
        width = int(enc.attention_mask[pick].sum(1).max())
        out_ = model(input_ids=enc.input_ids[pick, :width], attention_mask=enc.attention_mask[pick, :width],
                     labels=labels[pick, :width])
        step(out_.loss, opt, sched, model.parameters(), losses, bar)
    bar.close()
    save_llm(model, tokenizer, out)
    return losses
