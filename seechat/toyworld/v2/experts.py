"""Toy world v2's tiny experts: v1's sizes, LM and training loop (seechat.toyworld.experts), with a tokenizer
that has every box coordinate as one token and a CLIP that also learns, through linear heads dropped afterwards,
what is where on the patches the bridge reads (`DenseHeads`).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ...tiny import train_tokenizer
from ..experts import ExpertSizes, _cosine, step
from . import world


def make_tokenizers(texts: list[str]):
    """The text expert's tokenizer (glm4 template, <image> token) and CLIP's twin that appends an end token.

    Every box coordinate a 64-pixel picture can have (65 values on the 0..1000 scale) is one token, so that a
    coordinate is one choice among 65 rather than two or three digits in a row. They are learnt as ordinary
    BPE merges (the byte-level pre-tokenizer keeps a run of digits together), not added as tokens: seechat's
    processor encodes any added token found in message text as plain characters, so added coordinate tokens
    would be spelt out digit by digit in training anyway. `<box>` and `<ref>` are likewise a few BPE tokens.
    """
    from tokenizers.processors import TemplateProcessing

    boxes = [f"<ref>x</ref><box>({a},{b}),({b},{a})</box>" for a in NUMBER_TOKENS for b in NUMBER_TOKENS[::4]]
    tok = train_tokenizer(texts + boxes * 4, vocab_size=1400, template="glm4")
    tok.padding_side = "right"
    split = [n for n in NUMBER_TOKENS if len(tok(n, add_special_tokens=False).input_ids) != 1]
    if split:
        raise RuntimeError(f"the tokenizer splits box coordinates {split}: raise its vocab_size")
    clip_tok = train_tokenizer(texts, vocab_size=1000, template="glm4")
    eos = clip_tok.convert_tokens_to_ids("<|endoftext|>")
    # CLIP pools its text tower at the end token, so every encoded text must end with it.
    clip_tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="$A <|endoftext|>", special_tokens=[("<|endoftext|>", eos)]
    )
    clip_tok.model_max_length = CLIP_TEXT_LENGTH
    return tok, clip_tok


CLIP_TEXT_LENGTH = 48
NUMBER_TOKENS = list(dict.fromkeys(str(round(k * 1000 / world.IMAGE_SIZE)) for k in range(world.IMAGE_SIZE + 1)))
"""Every coordinate a box of a 64-pixel picture can have on the 0..1000 scale."""


def text_views(colour: str, kind: str, position: str | None) -> list[str]:
    """Descriptions of one shape at several levels of detail.

    Besides whole captions the vision expert also learns to match partial ones ("红色。", "在左上角。"),
    which makes it pick up each attribute on its own, and quickly.
    """
    views = [f"一个{colour}的{kind}。", f"{colour}。", f"{kind}。"]
    if position:
        views += [f"一个{colour}的{kind}在{position}。", f"在{position}。"]
    return views


def scene_views(scene: world.Scene) -> list[str]:
    """The whole caption first, then every partial description that fits the scene."""
    one = len(scene.shapes) == 1
    views = [v for s in scene.shapes for v in text_views(s.colour, s.kind, s.position if one else None)]
    return [scene.caption(), *dict.fromkeys(v for v in views if v != scene.caption())]


def cell_index(shape: world.Shape, grid: int) -> int:
    """The grid cell (row by row) that holds a shape's centre: where `dense_targets` puts what it says of it."""
    cell = world.IMAGE_SIZE / grid
    return min(grid - 1, int(shape.centre[1] // cell)) * grid + min(grid - 1, int(shape.centre[0] // cell))


def dense_targets(scenes: list[world.Scene], grid: int) -> dict[str, torch.Tensor]:
    """What the vision expert's dense heads learn to read off its last layer, as classes.

    Per patch: is a shape's centre there, and if so its colour, kind, nearest named position and the four
    coordinates of its box (each one of the 65 pixel values 0..64). On the CLS token: how many shapes there
    are in all, of each colour and of each kind (0..4). Classes rather than regressed numbers, so that the
    features hold them in a form that the text expert's output layer reads almost linearly.
    """
    n, cells = len(scenes), grid * grid
    colours, kinds, positions = list(world.COLOURS), list(world.SHAPES), list(world.POSITIONS)
    t = {"obj": torch.zeros(n, cells), "colour": torch.full((n, cells), -100, dtype=torch.long),
         "kind": torch.full((n, cells), -100, dtype=torch.long), "position": torch.full((n, cells), -100, dtype=torch.long),
         "box": torch.full((n, cells, 4), -100, dtype=torch.long),
         "counts": torch.zeros(n, 1 + len(colours) + len(kinds), dtype=torch.long)}
    for i, scene in enumerate(scenes):
        for s in scene.shapes:
            j = cell_index(s, grid)
            t["obj"][i, j] = 1
            t["colour"][i, j], t["kind"][i, j] = colours.index(s.colour), kinds.index(s.kind)
            t["position"][i, j] = positions.index(s.position)
            t["box"][i, j] = torch.tensor(s.box)
            t["counts"][i, 0] += 1
            t["counts"][i, 1 + colours.index(s.colour)] += 1
            t["counts"][i, 1 + len(colours) + kinds.index(s.kind)] += 1
    return t


class DenseHeads(torch.nn.Module):
    """Linear heads over the vision expert's last layer (dropped once it is trained)."""

    def __init__(self, width: int, weights: dict[str, float] | None = None, nothing: bool = False):
        super().__init__()
        self.weights, self.nothing = weights or {}, nothing
        self.sizes = {"obj": 1, "colour": len(world.COLOURS) + nothing, "kind": len(world.SHAPES) + nothing,
                      "position": len(world.POSITIONS), "box": 4 * (world.IMAGE_SIZE + 1)}
        self.patch = torch.nn.Linear(width, sum(self.sizes.values()))
        self.n_counts = 1 + len(world.COLOURS) + len(world.SHAPES)
        self.counts = torch.nn.Linear(width, self.n_counts * 5)

    def target(self, key: str, t: dict[str, torch.Tensor]) -> torch.Tensor:
        """The classes a head learns, one per patch (-100: nothing to learn there); with `nothing`, a patch holding
        no shape's centre is the last colour and kind class."""
        target = t[key].reshape(-1)
        if self.nothing and key in ("colour", "kind"):
            target = torch.where(t["obj"].reshape(-1) > 0, target, self.sizes[key] - 1)
        return target

    def loss(self, hidden: torch.Tensor, t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """hidden: the last layer (CLS first); returns the summed loss and accuracies on this batch."""
        out = dict(zip(self.sizes, self.patch(hidden[:, 1:]).split(list(self.sizes.values()), dim=-1)))
        losses = {"obj": F.binary_cross_entropy_with_logits(out["obj"][..., 0], t["obj"])}
        acc = {}
        for key in ("colour", "kind", "position", "box"):
            logits = out[key].reshape(-1, world.IMAGE_SIZE + 1) if key == "box" else out[key].reshape(-1, self.sizes[key])
            target = self.target(key, t)
            losses[key] = F.cross_entropy(logits, target, label_smoothing=0.1 if key == "box" else 0.0)
            here = t[key].reshape(-1) != -100  # judged where a shape is, with or without `nothing`
            acc[key] = ((logits.argmax(-1) - target)[here].abs() <= (1 if key == "box" else 0)).float().mean().item()
        counts = self.counts(hidden[:, 0]).reshape(-1, self.n_counts, 5)
        losses["counts"] = F.cross_entropy(counts.reshape(-1, 5), t["counts"].reshape(-1))
        acc["counts"] = (counts.argmax(-1) == t["counts"]).all(-1).float().mean().item()
        return sum(self.weights.get(k, 1.0) * v for k, v in losses.items()), acc


class FreshScenes:
    """Batches of scenes drawn and rendered anew at every call (one-shape scenes and, a share `multi` of
    them, 2-4 shapes; the training colour x shape pairs; the TRAIN style, or a share `wide` of them the wider
    variety `wide_style`, `world.WIDE` or a variant of it) as pixel values.

    The vision expert learns from these rather than from the build's fixed training pictures: on those 10,000
    its dense heads were right on every training batch after 6,000 steps while on the validation pictures
    they read the counts 81% right and the box coordinates within one pixel 93.7%: it had learnt them by
    heart. Drawing and rendering a picture takes about 1.2 ms, a few times less than a training step spends
    on it."""

    def __init__(self, seed: int, processor, multi: float = 0.5, augment: float = 0.0, wide: float = 0.0,
                 stream: str = "clip", wide_style: world.Style = world.WIDE):
        self.rng = random.Random(f"{stream}:{seed}")
        self.jitter = random.Random(f"{stream}-augment:{seed}")  # its own stream: the scenes stay those without it
        self.combos = world.training_combos(seed)
        self.processor, self.multi, self.augment, self.wide, self.wide_style = processor, multi, augment, wide, wide_style

    def __call__(self, n: int) -> tuple[torch.Tensor, list[world.Scene]]:
        # no draw at all when `wide` is 0, so that the jitter stream (and recipe 4's expert) stays as it was
        styles = [self.wide_style if self.wide and self.jitter.random() < self.wide else world.TRAIN for _ in range(n)]
        scenes = [world.any_scene(self.rng, self.combos, self.multi, style) for style in styles]
        images = [s.render() for s in scenes]
        if self.augment:
            images = [photometric(im, self.jitter) if self.jitter.random() < self.augment else im for im in images]
        return self.processor(images=images, return_tensors="pt")["pixel_values"], scenes


def photometric(image, rng: random.Random):
    """Whole-picture brightness, contrast and saturation jitter, the photometric part of the augmentation
    contrastive vision pretraining uses (SimCLR's colour jitter, without its hue shift: colour is a label here).

    It changes every pixel alike, shapes and background, unlike the renderer's own settings (the `shift`
    split's darker backgrounds, noise, blur and JPEG quality stay outside anything a training picture has)."""
    from PIL import ImageEnhance

    for enhance, (lo, hi) in ((ImageEnhance.Brightness, (0.7, 1.05)), (ImageEnhance.Contrast, (0.6, 1.1)),
                              (ImageEnhance.Color, (0.7, 1.3))):
        image = enhance(image).enhance(rng.uniform(lo, hi))
    return image


def train_clip(out: Path, batches, tokenizer, *,
               sizes: ExpertSizes, steps: int, batch: int, seed: int, lr: float = 1e-3, image_processor=None,
               full_caption_share: float = 0.4, position_std: float = 0.5, dense_weight: float = 1.0,
               kind_weight: float = 1.0, nothing: bool = False, progress=None, init: Path | None = None,
               heldout: dict[str, tuple[torch.Tensor, list[world.Scene]]] | None = None
               ) -> tuple[list[float], dict[str, dict[str, float]]]:
    """CLIPModel training on the world's pictures, `batches(n)` -> (pixel values, scenes) of n pictures (a
    `FreshScenes`); saves it with its tokenizer. Returns the losses and, with `heldout` {name: (pixels,
    scenes)}, the dense heads' accuracies on those pictures: how well what the bridge reads says what is where
    (box coordinates within one pixel; counts all right).

    Two objectives: contrastive on (picture, description) pairs, each picture paired with its whole caption
    or a partial description, every picture a description fits counting as a match (several per row and
    column); and a dense one on the last layer's patch features (what the bridge reads): each patch says
    whether a shape's centre lies in it, its colour, kind and box. The dense head is dropped after training
    (a toy stand-in for the detection data real vision experts have seen); the saved model is a plain
    CLIPModel. With `init` (a saved CLIPModel), training goes on from it, its dense heads learnt anew.
    """
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=sizes.text_hidden, intermediate_size=sizes.text_hidden * 4,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=CLIP_TEXT_LENGTH,
                         eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, bos_token_id=eos),
        vision_config=dict(hidden_size=sizes.vision_hidden, intermediate_size=sizes.vision_hidden * 4,
                           num_hidden_layers=sizes.vision_layers, num_attention_heads=4,
                           image_size=world.IMAGE_SIZE, patch_size=sizes.patch_size),
        projection_dim=64,
    )
    model = CLIPModel.from_pretrained(init) if init is not None else CLIPModel(config)
    grid = 4  # what the bridge reads: the patches themselves (patch 16) or 2x2-pooled (patch 8)
    head = DenseHeads(sizes.vision_hidden, {"kind": kind_weight}, nothing)
    with torch.no_grad():
        # Hugging Face initialises position embeddings at std 0.02, far below the patch embeddings, so where
        # a shape sits is nearly invisible at first and position is learned last; start them comparable.
        if init is None:
            model.vision_model.embeddings.position_embedding.weight.normal_(std=position_std)
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, steps, max(1, steps // 10)))
    pyrng = random.Random(seed)
    losses = []
    model.train()
    bar = tqdm(total=steps, desc="vision expert (CLIP)", unit="step", leave=False) if progress is None else progress
    for _ in range(steps):
        pixels, scenes = batches(batch)
        views = [scene_views(s) for s in scenes]
        texts = [v[0] if pyrng.random() < full_caption_share else pyrng.choice(v) for v in views]
        enc = tokenizer(texts, padding=True, truncation=True, max_length=CLIP_TEXT_LENGTH, return_tensors="pt")
        out_ = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, pixel_values=pixels,
                     output_hidden_states=True)
        logits = out_.logits_per_image
        fits = torch.tensor([[t in v for t in texts] for v in views], dtype=torch.float)
        loss = (F.cross_entropy(logits, fits / fits.sum(1, keepdim=True))
                + F.cross_entropy(logits.t(), fits.t() / fits.t().sum(1, keepdim=True))) / 2
        dense, acc = head.loss(_pooled(out_.vision_model_output.hidden_states[-1]), dense_targets(scenes, grid))
        step(loss + dense_weight * dense, opt, sched, params, losses, bar, **acc)
    bar.close()
    model.eval()
    probe: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for name, (pixels, scenes) in (heldout or {}).items():
            hidden = model.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
            acc = head.loss(_pooled(hidden), dense_targets(scenes, grid))[1]
            probe[name] = {k: round(v, 4) for k, v in acc.items()}
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if image_processor is not None:
        image_processor.save_pretrained(out)
    return losses, probe


def _pooled(hidden: torch.Tensor, grid: int = 4) -> torch.Tensor:
    """CLS + the patches averaged 2x2 down to `grid` x `grid` when there are more (as seechat's vision.pool '2x2')."""
    side = int(round((hidden.shape[1] - 1) ** 0.5))
    if side == grid:
        return hidden
    b, _, c = hidden.shape
    maps = hidden[:, 1:].transpose(1, 2).reshape(b, c, side, side)
    pooled = F.avg_pool2d(maps, side // grid).flatten(2).transpose(1, 2)
    return torch.cat([hidden[:, :1], pooled], dim=1)


def lm_texts(conversations: list[dict], grounded: dict[str, str], tokenizer, *, copy_prompt: str | None = None,
             max_exchanges: int = 3) -> list[str]:
    """Chat-formatted text: each picture's grounded description (caption and boxes) stands where the picture
    will later be, then the conversation's first `max_exchanges` questions and answers.

    With `copy_prompt`, every picture also gets a text that asks it and answers with the description itself:
    the skill Stage I needs (the frozen text expert repeating what stands in the picture's place).
    """
    texts = []
    for convo in conversations:
        images = convo["image"] if isinstance(convo["image"], list) else [convo["image"]]
        queue = list(images)
        messages = []
        for t in convo["conversations"][: 2 * max_exchanges]:
            value = t["value"]
            while "<image>\n" in value:
                value = value.replace("<image>\n", grounded[queue.pop(0)] + "\n", 1)
            messages.append({"role": "user" if t["from"] == "human" else "assistant", "content": value})
        texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
    if copy_prompt:
        for text in grounded.values():
            messages = [{"role": "user", "content": f"{text}\n{copy_prompt}"}, {"role": "assistant", "content": text}]
            texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
    return texts
