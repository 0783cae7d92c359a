"""The vision expert: a Hugging Face image encoder and the choice of which features feed the bridge.

Supported families (by the checkpoint's `model_type`): CLIP, Chinese-CLIP, SigLIP and BLIP-2's EVA ViT-g;
CNNs (EfficientNet-Lite0, transformers' ResNet and ConvNeXt) and timm backbones load through seechat/model/cnn.py.
A full checkpoint (vision + text towers) or a vision-only one both load; the text tower is not loaded.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    Blip2VisionModel,
    ChineseCLIPVisionModel,
    CLIPVisionModel,
    SiglipVisionModel,
)

from ..config import VisionConfig
from ..errors import ConfigError, ModelDirError
from .cnn import HF_CNNS, feature_map_loader, load_hf_cnn
from .hub import loading

# model_type of the checkpoint -> (vision class, key_mapping for from_pretrained).
# BLIP-2 keeps its vision model under `vision_model.` in a composite checkpoint; the mapping lets
# from_pretrained take just those weights.
VISION_MODELS = {
    "clip": (CLIPVisionModel, None),
    "clip_vision_model": (CLIPVisionModel, None),
    "chinese_clip": (ChineseCLIPVisionModel, None),
    "chinese_clip_vision_model": (ChineseCLIPVisionModel, None),
    "siglip": (SiglipVisionModel, None),
    "siglip_vision_model": (SiglipVisionModel, None),
    "blip-2": (Blip2VisionModel, {r"^vision_model\.": ""}),
    "blip_2_vision_model": (Blip2VisionModel, None),
}


class VisionExpert(nn.Module):
    """Wraps a HF vision model; returns (batch, tokens, hidden) features for the bridge."""

    def __init__(self, model: nn.Module, config: VisionConfig):
        super().__init__()
        self.model = model
        self.config = config
        mc = model.config
        self.hidden_size: int = mc.hidden_size * len(config.layers)  # several layers: concatenated along channels
        self.levels: list[int] = [mc.hidden_size] * len(config.layers)
        """The channels of each concatenated layer (bridge.norm normalises each level on its own)."""
        self.has_cls = _has_cls(model)
        grid = mc.image_size // mc.patch_size
        if config.pool == "global":
            raise ConfigError("vision.pool 'global' is for CNN feature maps; a ViT takes 'none', '2x2' or 'stack2x2'")
        if config.pool in ("2x2", "stack2x2") and grid % 2:
            raise ConfigError(f"vision.pool {config.pool!r} needs an even patch grid, but this model has "
                              f"{grid}x{grid} patches")
        if config.pool == "stack2x2":
            if self.has_cls and config.keep_cls:
                raise ConfigError("vision.pool 'stack2x2' makes tokens 4x wider than the CLS token: set keep_cls false")
            self.hidden_size *= 4
            self.levels *= 4  # per token: the block's top-left, top-right, bottom-left, bottom-right patch
        self.grid = grid
        patches = grid * grid if config.pool == "none" else (grid // 2) ** 2
        self.num_tokens: int = patches + int(self.has_cls and config.keep_cls)
        self.only_needed_layers = False
        """Run the encoder only up to feature_layer (the same features; seechat train turns it on)."""
        n_layers = mc.num_hidden_layers
        for layer in config.layers:
            if not -n_layers - 1 <= layer <= n_layers:
                raise ConfigError(
                    f"vision.feature_layer {layer} is out of range for a {n_layers}-layer model "
                    f"(use -1 for the last layer, -2 for the one before)"
                )
        self.indices = [layer % (n_layers + 1) for layer in config.layers]  # into hidden_states
        if len(set(self.indices)) < len(self.indices):
            raise ConfigError(f"vision.feature_layer {config.feature_layer} names one layer twice")

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        index = max(self.indices)  # the deepest layer needed
        encoder = getattr(getattr(self.model, "vision_model", self.model), "encoder", None)
        layers = getattr(encoder, "layers", None)
        if self.only_needed_layers and isinstance(layers, nn.ModuleList) and index < len(layers):
            # The layers after the feature layer cannot change the features: leave them out of this call.
            encoder.layers = layers[:index]
            try:
                out = self.model(pixel_values=pixel_values.to(self.dtype), output_hidden_states=True)
            finally:
                encoder.layers = layers
        else:
            out = self.model(pixel_values=pixel_values.to(self.dtype), output_hidden_states=True)
        levels = [out.hidden_states[i] for i in self.indices]
        if self.config.post_layernorm:
            levels = [_post_layernorm(self.model)(f) for f in levels]
        feats = torch.cat(levels, dim=-1) if len(levels) > 1 else levels[0]
        cls, patches = (feats[:, :1], feats[:, 1:]) if self.has_cls else (None, feats)
        b, n, d = patches.shape
        if self.config.pool == "2x2":
            grid = patches.transpose(1, 2).reshape(b, d, self.grid, self.grid)
            patches = nn.functional.avg_pool2d(grid, 2).flatten(2).transpose(1, 2)
        elif self.config.pool == "stack2x2":
            g = self.grid // 2
            patches = patches.reshape(b, g, 2, g, 2, d).permute(0, 1, 3, 2, 4, 5).reshape(b, g * g, 4 * d)
        if cls is not None and self.config.keep_cls:
            patches = torch.cat([cls, patches], dim=1)
        return patches


def load_vision(config: VisionConfig, path: str, dtype: torch.dtype | None = None) -> VisionExpert:
    """Load the vision expert at `path` (hub id or directory) with the real from_pretrained."""
    cnn_loader = feature_map_loader(path)  # EfficientNet-Lite0 and timm backbones: seechat/model/cnn.py
    if cnn_loader is not None:
        with loading("vision expert", path):
            return cnn_loader(config, path, dtype)
    with loading("vision expert", path):
        hf_config = AutoConfig.from_pretrained(path)
    model_type = hf_config.model_type
    if model_type in HF_CNNS:  # a hub id of a transformers CNN (a folder was routed above)
        with loading("vision expert", path):
            return load_hf_cnn(config, path, dtype)
    if model_type not in VISION_MODELS:
        raise ModelDirError(
            f"'{path}' is a {model_type!r} checkpoint; the vision expert must be one of "
            f"{sorted([*VISION_MODELS, *HF_CNNS, 'efficientnet_lite0', 'timm_wrapper'])}"
        )
    cls, key_mapping = VISION_MODELS[model_type]
    kwargs = {"key_mapping": key_mapping} if key_mapping else {}
    with loading("vision expert", path):
        model = cls.from_pretrained(path, dtype=dtype, **kwargs)
    model.eval()
    return VisionExpert(model, config)


def load_image_processor(path: str):
    with loading("image processor", path):
        return AutoImageProcessor.from_pretrained(path)


def _has_cls(model: nn.Module) -> bool:
    embeddings = model.vision_model.embeddings if hasattr(model, "vision_model") else model.embeddings
    return hasattr(embeddings, "class_embedding")


def _post_layernorm(model: nn.Module) -> nn.Module:
    inner = model.vision_model if hasattr(model, "vision_model") else model
    return inner.post_layernorm
