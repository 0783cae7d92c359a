"""The composition of a seechat model: which vision expert, which bridge, which text expert.

These dataclasses are the single source of truth. `seechat.json` inside a model directory and the
YAML recipes under configs/ are serialised copies of them; unknown keys are errors.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

FORMAT_VERSION = 1
POOLING = ("none", "2x2", "stack2x2", "global")


@dataclass
class VisionConfig:
    """The vision expert (frozen in both training stages by default)."""

    name_or_path: str = ""
    """Hub id or local path of a CLIP, Chinese-CLIP, SigLIP or BLIP-2 checkpoint (full or vision-only)."""
    feature_layer: int | list[int] = -2
    """Which hidden layer feeds the bridge (-1 is the last layer; LLaVA uses -2), or a list of layers whose features
    are concatenated along channels (multi-level features: e.g. [0, -1] for a CNN puts its first map, which keeps
    colour, beside its last one, which knows shapes). A ViT's layers share one token grid; a CNN's finer maps are
    pooled (level_pool) straight to the token grid: the coarsest listed map's grid after `pool`. For a CNN, layer 0 is the stem's map, then one
    per block, and -1 the head's."""
    post_layernorm: bool = False
    """Apply the vision model's post-layernorm to that layer (BLIP-2 feeds its Q-Former this way)."""
    keep_cls: bool = False
    """Keep the CLS token in front of the patch tokens (models without one, like SigLIP, ignore this)."""
    level_pool: str = "avg"
    """CNN multi-level features only: how a finer map is brought down to the token grid, 'avg' (adaptive average
    pooling) or 'max' (adaptive max pooling: the strongest response in each cell, e.g. the colour of a small shape
    on a plain background, whatever its size)."""
    pool: str = "none"
    """Token pooling: 'none', '2x2' (average each 2x2 block of patches: 4x fewer image tokens), 'stack2x2' (ViTs:
    each 2x2 block's four patches side by side along channels, as InternVL's and Idefics3's pixel shuffle do: 4x
    fewer tokens, 4x wider, nothing averaged away), or 'global' (CNN feature maps only: one token, the average over
    the map)."""

    def __post_init__(self) -> None:
        if self.pool not in POOLING:
            raise ConfigError(f"vision.pool must be one of {list(POOLING)}, got {self.pool!r}")
        if self.level_pool not in ("avg", "max"):
            raise ConfigError(f"vision.level_pool must be 'avg' or 'max', got {self.level_pool!r}")
        if isinstance(self.feature_layer, list) and (not self.feature_layer
                                                     or len(set(self.feature_layer)) < len(self.feature_layer)):
            raise ConfigError(f"vision.feature_layer as a list needs distinct layers, got {self.feature_layer}")

    @property
    def layers(self) -> list[int]:
        """feature_layer as a list (one layer or several)."""
        return list(self.feature_layer) if isinstance(self.feature_layer, list) else [self.feature_layer]


@dataclass
class BridgeConfig:
    """The learnable bridge from vision features to text-expert embeddings."""

    type: str = "mlp"
    """One of: linear, mlp, qformer."""
    depth: int = 2
    """mlp only: number of linear layers, GELU between them (LLaVA-1.5 uses 2)."""
    hidden: int | None = None
    """mlp only: width of the layers between the first and the last (None: the text expert's hidden size, as in
    LLaVA-1.5)."""
    norm: bool = False
    """linear and mlp: a LayerNorm over each token's vision features before the first layer (InternVL's and
    Qwen2-VL's projectors start this way), one per level when vision.feature_layer lists several. Features far from
    unit scale (a CNN's ReLU6 map: tokens ~50x the norm of a text embedding, mostly a part shared by every picture)
    otherwise reach the text expert as huge, nearly identical tokens."""
    kernel: int = 1
    """linear and mlp: how many tokens across the bridge reads, over the vision expert's token grid: 1 (each token
    on its own, as LLaVA's projector) or an odd k (each token plus a k x k convolution of its neighbourhood, learnt
    from zero: a shape lying across two tokens can then be given to one of them). Needs a square token grid (a
    leading CLS token is read alone)."""
    position: bool = False
    """linear and mlp: a learnt vector per image-token place added to the bridge's output, zero at the start (as the
    position embeddings of Qwen-VL's resampler): each token's place reaches the text expert whatever the picture
    looks like. Needs the same number of image tokens for every picture (a fixed-size vision expert)."""
    num_queries: int = 32
    """qformer only: learned query tokens, which is also the number of image tokens per image."""
    qformer: dict[str, Any] = field(default_factory=dict)
    """qformer only: Blip2QFormerConfig fields (hidden_size, num_hidden_layers, ...); filled in on build."""
    qformer_from: str | None = None
    """qformer only: a BLIP-2 checkpoint (hub id or path) whose Q-Former and query tokens initialise the bridge."""
    frozen_qformer: bool = False
    """qformer only: keep the Q-Former and queries exactly as loaded from qformer_from: never trained and not
    stored in bridge.safetensors (SEEChat V1 does this; only the final linear layer trains)."""

    def __post_init__(self) -> None:
        if self.depth < 1:
            raise ConfigError(f"bridge.depth must be >= 1, got {self.depth}")
        if self.hidden is not None and self.hidden < 1:
            raise ConfigError(f"bridge.hidden must be >= 1 (or null: the text expert's width), got {self.hidden}")
        if self.num_queries < 1:
            raise ConfigError(f"bridge.num_queries must be >= 1, got {self.num_queries}")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ConfigError(f"bridge.kernel must be an odd number >= 1 (1: each token alone, 3: 3x3 neighbours), "
                              f"got {self.kernel}")
        for name, used in (("kernel", self.kernel > 1), ("norm", self.norm), ("position", self.position)):
            if used and self.type not in ("linear", "mlp"):
                raise ConfigError(f"bridge.{name} applies to the linear and mlp bridges, not {self.type!r}")
        if self.frozen_qformer and not self.qformer_from:
            raise ConfigError("bridge.frozen_qformer needs bridge.qformer_from (a BLIP-2 checkpoint to take it from)")


@dataclass
class LLMConfig:
    """The text expert: any Hugging Face causal LM that accepts inputs_embeds."""

    name_or_path: str = ""
    """Hub id or local path of the causal LM (its tokenizer is loaded from the same place)."""
    chat_template: str | None = None
    """A built-in template name (chatml, gemma, glm4, llama3, seechat_v1) to install in the tokenizer,
    or null to keep the tokenizer's own template."""
    adapter: str | None = None
    """Path of a peft LoRA adapter applied on load (written by instruction tuning)."""
    trust_remote_code: bool = False
    """Run code shipped with the checkpoint. Off unless you trust its author."""
    stop_tokens: list[str] = field(default_factory=list)
    """Tokens that end an answer besides the tokenizer's EOS (the template's end-of-turn token)."""


@dataclass
class SeeChatConfig:
    """One stitched model: vision -> bridge -> llm, and how images appear in the text."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    bridge: BridgeConfig = field(default_factory=BridgeConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    image_token: str = "<image>"
    """The placeholder token; each <image> marker in a user message becomes N of them."""
    image_start: str = ""
    """Text put before each image's tokens (SEEChat V1 uses <Img>); `{n}` becomes the image's number in the
    conversation, 1, 2, ... (e.g. "图{n}：", like Qwen-VL's "Picture 1: " labels)."""
    image_end: str = ""
    """Text put after each image's tokens (SEEChat V1 uses </Img>)."""
    system_prompt: str | None = None
    """A system message put first in every conversation, if the template supports one."""
    default_prompt: str = "详细描述这张图片"
    """What the terminal chat asks first about each image ('describe this image in detail')."""
    max_context: int | None = None
    """Tokens the text expert may see; null means its max_position_embeddings."""

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT_VERSION, **dataclasses.asdict(self)}

    def to_json_string(self) -> str:
        """As Hugging Face configs offer it (the Trainer's TensorBoard logger records it)."""
        import json

        return json.dumps(self.to_dict(), ensure_ascii=False, indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> "SeeChatConfig":
        data = dict(data)
        fmt = data.pop("format", FORMAT_VERSION)
        if fmt != FORMAT_VERSION:
            raise ConfigError(f"{where}: format {fmt} is not supported (this seechat reads format {FORMAT_VERSION})")
        return from_dict(cls, data, where)


def from_dict(cls, data: Any, where: str = "config"):
    """Build dataclass `cls` from a mapping (nested dataclasses and lists of them included).

    Unknown keys and values of the wrong type are errors that name the key and the valid choices.
    """
    return _build(cls, data, where)


def _build(cls, data: Any, where: str):
    """Build dataclass `cls` from a dict, refusing unknown keys and wrong types with a clear message."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys are {sorted(names)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in data.items():
        value = _nested(value, hints[key], f"{where}.{key}")
        if not _matches(value, hints[key]):
            raise ConfigError(f"{where}.{key} must be {_type_name(hints[key])}, got {value!r}")
        values[key] = value
    return cls(**values)


def _nested(value: Any, hint: Any, where: str) -> Any:
    """Build nested dataclasses (or lists of them) from mappings, as the type hint says."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    for option in options:
        if dataclasses.is_dataclass(option) and isinstance(value, dict):
            return _build(option, value, where)
        if typing.get_origin(option) is list and isinstance(value, list):
            (item,) = typing.get_args(option) or (Any,)
            if dataclasses.is_dataclass(item):
                return [_build(item, v, f"{where}[{i}]") if isinstance(v, dict) else v for i, v in enumerate(value)]
    return value


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is Any:
        return True
    if dataclasses.is_dataclass(hint):
        return isinstance(value, hint)
    base = origin or hint
    if base is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if base is list:
        (item,) = typing.get_args(hint) or (Any,)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    return isinstance(value, base)


def _type_name(hint: Any) -> str:
    if dataclasses.is_dataclass(hint):
        return f"a mapping of {hint.__name__} fields"
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")
