"""Image-text relevance with a CLIP-family model: the judge of the caption win-rate.

    scorer = ClipScorer.load("OFA-Sys/chinese-clip-vit-base-patch16")   # or a local directory
    scores = scorer.score([img1, img2], [["红色的圆", "蓝色的方块"], ["蓝色的方块"]])

The model class comes from the checkpoint's config `model_type` (chinese_clip, clip or siglip); the tokenizer
and the image processor are loaded from the same directory with AutoTokenizer and AutoImageProcessor.
A score is the model's own `logits_per_image` entry for the pair: the cosine of the normalised image and text
embeddings times exp(logit_scale), plus logit_bias for SigLIP. Scores of one scorer compare across captions;
texts that tokenize alike get identical scores for one image (each is encoded once per image batch).
Texts longer than the judge's text length are cut: 52 tokens for Chinese-CLIP (as its own tokenize() does),
the model's position count (77 for CLIP, 64 for SigLIP) otherwise, or --max-text-tokens.
"""

from __future__ import annotations

import inspect
import os

import torch
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, ChineseCLIPModel, CLIPModel, SiglipModel

from ..errors import ConfigError, ModelDirError
from ..model.checkpoint import resolve_device
from ..model.hub import loading

SCORERS = {
    "chinese_clip": ChineseCLIPModel,
    "clip": CLIPModel,
    "siglip": SiglipModel,
}
"""config model_type -> the model class that scores image-text pairs."""
TEXT_TOKENS = {"chinese_clip": 52}
"""Default text length by model_type: Chinese-CLIP's own tokenize() cuts texts at 52 tokens ([CLS] and [SEP]
included), the length all its models were trained with; other models use their position-embedding count."""
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "tokenizer.model",
                   "sentencepiece.bpe.model")


class ClipScorer:
    """A CLIP-family model with its tokenizer and image processor."""

    def __init__(self, model, tokenizer, image_processor, *, max_length: int):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.max_length = max_length
        self.model_type = model.config.model_type
        # SigLIP was trained on texts padded to max_length and pools the last position, so it needs that padding
        self.padding = "max_length" if self.model_type == "siglip" else True
        self._accepts = set(inspect.signature(model.forward).parameters)

    @classmethod
    def load(cls, name_or_path: str, *, device: str = "auto", max_text_tokens: int = 0) -> ClipScorer:
        """Load a judge; texts are cut at max_text_tokens (0: TEXT_TOKENS or the model's position count)."""
        if not name_or_path:
            raise ConfigError("give the scorer with --scorer DIR (a Chinese-CLIP, CLIP or SigLIP checkpoint)")
        with loading("scorer", name_or_path):
            config = AutoConfig.from_pretrained(name_or_path)
        model_class = SCORERS.get(config.model_type)
        if model_class is None:
            raise ModelDirError(
                f"the scorer '{name_or_path}' is a {config.model_type!r} checkpoint; the win-rate needs a full "
                f"image-text model, one of {sorted(SCORERS)}"
            )
        with loading("scorer", name_or_path):
            model = model_class.from_pretrained(name_or_path, dtype=torch.float32)
        with loading("scorer's image processor", name_or_path):
            image_processor = AutoImageProcessor.from_pretrained(name_or_path)
        no_tokenizer = ModelDirError(
            f"the scorer '{name_or_path}' has no usable tokenizer: save the tokenizer beside the model "
            "(tokenizer.save_pretrained(DIR))"
        )
        # transformers 5 quietly builds an empty tokenizer when a directory has none: check the files first
        if os.path.isdir(name_or_path) and not any(os.path.isfile(os.path.join(name_or_path, f))
                                                    for f in TOKENIZER_FILES):
            raise no_tokenizer
        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise no_tokenizer from exc
        if len(tokenizer) - len(set(tokenizer.all_special_ids)) < 2:
            raise no_tokenizer
        positions = int(getattr(model.config.text_config, "max_position_embeddings", 77))
        limit = min(max_text_tokens or TEXT_TOKENS.get(config.model_type, positions), positions)
        return cls(model.to(resolve_device(device)), tokenizer, image_processor, max_length=limit)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def score(self, images: list, texts: list[list[str]]) -> list[list[float]]:
        """scores[i][j]: relevance of texts[i][j] to images[i] (PIL images), computed in one forward pass."""
        if len(images) != len(texts):
            raise ValueError("score() needs one list of texts per image")
        if not images:
            return []
        distinct = list(dict.fromkeys(t for row in texts for t in row))
        if not distinct:
            return [[] for _ in images]
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        tokens = self.tokenizer(distinct, padding=self.padding, truncation=True, max_length=self.max_length,
                                return_tensors="pt")
        tokens = {k: v for k, v in tokens.items() if k in self._accepts}
        # texts that tokenize alike (equal after truncation) are encoded once, so they score exactly alike
        keys = [tuple(tuple(v[j].tolist()) for v in tokens.values()) for j in range(len(distinct))]
        first = {}  # key -> the first row with it
        for j, key in enumerate(keys):
            first.setdefault(key, j)
        position = {key: i for i, key in enumerate(first)}
        column = {t: position[key] for t, key in zip(distinct, keys)}
        rows = list(first.values())
        inputs = {k: v[rows].to(self.device) for k, v in tokens.items()}
        with torch.no_grad():
            out = self.model(pixel_values=pixels.to(self.device), **inputs)
        logits = out.logits_per_image.float().cpu()
        return [[float(logits[i, column[t]]) for t in row] for i, row in enumerate(texts)]
