"""Bridges: the small learnable part that turns vision features into text-expert embeddings.

BRIDGES maps a config key to its class. Each bridge takes (batch, n_in, vision_dim) features and
returns (batch, num_tokens(n_in), llm_dim) embeddings.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel

from ..config import BridgeConfig
from ..errors import ConfigError
from .hub import loading, resolve


class LevelNorm(nn.Module):
    """A LayerNorm over each level's channels of every token (bridge.norm): `levels` lists the channel counts of
    the vision features concatenated along channels (one entry unless vision.feature_layer lists several layers),
    so a level of large values cannot drown the others."""

    def __init__(self, levels: list[int]):
        super().__init__()
        self.levels = list(levels)
        self.norms = nn.ModuleList(nn.LayerNorm(c) for c in self.levels)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        parts = feats.split(self.levels, dim=-1)
        return torch.cat([norm(part) for norm, part in zip(self.norms, parts)], dim=-1)


class GridMix(nn.Module):
    """Adds to each image token a k x k convolution of its neighbourhood on the token grid (bridge.kernel), so that
    the layer after it reads each token together with its neighbours (the convolutional projectors of Honeybee's
    C-Abstractor and MobileVLM's LDP mix neighbours too). Starts at zero: an untrained mix is the per-token bridge.
    A leading CLS token, which has no place on the grid, passes unchanged."""

    def __init__(self, width: int, kernel: int):
        super().__init__()
        self.conv = nn.Conv2d(width, width, kernel, padding=kernel // 2)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        b, n, c = feats.shape
        grid = math.isqrt(n)
        cls = n - grid * grid
        if cls not in (0, 1) or grid == 0:
            raise ConfigError(f"bridge.kernel {self.conv.kernel_size[0]} reads a square grid of image tokens, but the "
                              f"vision expert gives {n}: use bridge.kernel 1")
        mixed = self.conv(feats[:, cls:].transpose(1, 2).reshape(b, c, grid, grid)).flatten(2).transpose(1, 2)
        return torch.cat([feats[:, :cls], feats[:, cls:] + mixed], dim=1)


class Places(nn.Module):
    """A learnt vector per image-token place, added to the bridge's output (bridge.position); zero at the start."""

    def __init__(self, n_tokens: int | None, llm_dim: int):
        super().__init__()
        if not n_tokens:
            raise ConfigError("bridge.position needs a vision expert with a fixed number of image tokens")
        self.weight = nn.Parameter(torch.zeros(n_tokens, llm_dim))

    def forward(self, out: torch.Tensor) -> torch.Tensor:
        if out.shape[1] != self.weight.shape[0]:
            raise ConfigError(f"bridge.position was made for {self.weight.shape[0]} image tokens, but this picture "
                              f"gave {out.shape[1]}: use bridge.position false with this vision expert")
        return out + self.weight.to(out.dtype)


class TokenBridge(nn.Module):
    """What the linear and mlp bridges share: each image token mapped alone (`map`, the subclass's), with
    bridge.norm and bridge.kernel's neighbour mix before it and bridge.position's vectors after it."""

    def __init__(self, config: BridgeConfig, vision_dim: int, llm_dim: int, levels: list[int] | None = None,
                 n_tokens: int | None = None):
        super().__init__()
        self.norm = LevelNorm(levels or [vision_dim]) if config.norm else None
        self.places = Places(n_tokens, llm_dim) if config.position else None
        self.mix = GridMix(vision_dim, config.kernel) if config.kernel > 1 else None

    def num_tokens(self, n_in: int) -> int:
        return n_in

    def map(self, feats: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        if self.norm is not None:
            feats = self.norm(feats)
        if self.mix is not None:
            feats = self.mix(feats)
        out = self.map(feats)
        return self.places(out) if self.places is not None else out


class LinearBridge(TokenBridge):
    """One linear layer per image token (MiniGPT-4 and SEEChat V1 put one after a Q-Former)."""

    def __init__(self, config: BridgeConfig, vision_dim: int, llm_dim: int, levels: list[int] | None = None,
                 n_tokens: int | None = None):
        super().__init__(config, vision_dim, llm_dim, levels, n_tokens)
        self.proj = nn.Linear(vision_dim, llm_dim)

    def map(self, feats: torch.Tensor) -> torch.Tensor:
        return self.proj(feats)


class MLPBridge(TokenBridge):
    """`depth` linear layers with GELU between them, per image token (LLaVA-1.5: depth 2)."""

    def __init__(self, config: BridgeConfig, vision_dim: int, llm_dim: int, levels: list[int] | None = None,
                 n_tokens: int | None = None):
        super().__init__(config, vision_dim, llm_dim, levels, n_tokens)
        widths = [vision_dim] + [config.hidden or llm_dim] * (config.depth - 1) + [llm_dim]
        layers: list[nn.Module] = [nn.Linear(widths[0], widths[1])]
        for a, b in zip(widths[1:-1], widths[2:]):
            layers += [nn.GELU(), nn.Linear(a, b)]
        self.layers = nn.Sequential(*layers)

    def map(self, feats: torch.Tensor) -> torch.Tensor:
        return self.layers(feats)


class QFormerBridge(nn.Module):
    """BLIP-2's Q-Former: learned queries cross-attend to the vision features, then a linear layer.

    Always `num_queries` image tokens, whatever the vision expert's token count. Built on transformers'
    Blip2QFormerModel, so BLIP-2 Q-Former weights load (config.qformer_from); the constructor itself
    never touches the network.
    """

    def __init__(self, config: BridgeConfig, vision_dim: int, llm_dim: int):
        super().__init__()
        qcfg = Blip2QFormerConfig(**{**config.qformer, "encoder_hidden_size": vision_dim})
        self.qformer = Blip2QFormerModel(qcfg)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_queries, qcfg.hidden_size))
        nn.init.normal_(self.query_tokens, std=qcfg.initializer_range)
        self.proj = nn.Linear(qcfg.hidden_size, llm_dim)

    def num_tokens(self, n_in: int) -> int:
        return self.query_tokens.shape[1]

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        queries = self.query_tokens.expand(feats.shape[0], -1, -1).to(feats.dtype)
        mask = torch.ones(feats.shape[:2], dtype=torch.long, device=feats.device)
        out = self.qformer(query_embeds=queries, encoder_hidden_states=feats, encoder_attention_mask=mask)
        return self.proj(out.last_hidden_state)


BRIDGES = {"linear": LinearBridge, "mlp": MLPBridge, "qformer": QFormerBridge}


def build_bridge(config: BridgeConfig, vision_dim: int, llm_dim: int, levels: list[int] | None = None,
                 n_tokens: int | None = None) -> nn.Module:
    """The bridge for `vision_dim`-wide features; `levels`: the channels of each concatenated level (bridge.norm);
    `n_tokens`: the vision expert's tokens per picture (bridge.position)."""
    if config.type not in BRIDGES:
        raise ConfigError(f"unknown bridge type {config.type!r}; valid types are {sorted(BRIDGES)}")
    if levels is not None and sum(levels) != vision_dim:
        raise ConfigError(f"the vision feature levels {levels} do not add up to {vision_dim} channels")
    if config.type == "qformer":
        return QFormerBridge(config, vision_dim, llm_dim)
    return BRIDGES[config.type](config, vision_dim, llm_dim, levels, n_tokens)


def qformer_config_from(source: str, base: str | None = None) -> tuple[dict, int]:
    """The Blip2QFormerConfig fields and the query count of a BLIP-2 checkpoint (hub id or path)."""
    from transformers import AutoConfig

    path = resolve(source, base)
    with loading("BLIP-2 checkpoint", path):
        cfg = AutoConfig.from_pretrained(path)
    if cfg.model_type != "blip-2":
        raise ConfigError(f"bridge.qformer_from '{source}' is a {cfg.model_type!r} checkpoint, not a BLIP-2 one")
    return qformer_fields(cfg.qformer_config), cfg.num_query_tokens


def load_qformer_weights(bridge: QFormerBridge, source: str, base: str | None = None) -> None:
    """Copy the Q-Former and its query tokens from a BLIP-2 checkpoint into `bridge` (the proj layer is not touched)."""
    path = resolve(source, base)
    with loading("BLIP-2 Q-Former", path):
        qformer = Blip2QFormerModel.from_pretrained(path, key_mapping={r"^qformer\.": ""})
        query_tokens = _read_tensor(path, "query_tokens")
    if query_tokens.shape != bridge.query_tokens.shape:
        raise ConfigError(
            f"'{source}' has query tokens of shape {tuple(query_tokens.shape)}, but the bridge expects "
            f"{tuple(bridge.query_tokens.shape)}: set bridge.num_queries to match"
        )
    bridge.qformer.load_state_dict(qformer.state_dict())
    with torch.no_grad():
        bridge.query_tokens.copy_(query_tokens)


def qformer_fields(qcfg) -> dict:
    keys = (
        "hidden_size num_hidden_layers num_attention_heads intermediate_size hidden_act hidden_dropout_prob "
        "attention_probs_dropout_prob max_position_embeddings initializer_range layer_norm_eps "
        "cross_attention_frequency"
    ).split()
    return {k: getattr(qcfg, k) for k in keys if hasattr(qcfg, k)}


def _read_tensor(path: str, key: str) -> torch.Tensor:
    """Read one tensor from a (possibly sharded) safetensors checkpoint without loading the rest.

    transformers has no public call for a single top-level parameter of a composite model.
    """
    import json

    from safetensors import safe_open
    from transformers.utils.hub import cached_file

    index = cached_file(path, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False)
    if index:
        with open(index) as fh:
            shard = json.load(fh)["weight_map"][key]
        file = cached_file(path, shard)
    else:
        file = cached_file(path, "model.safetensors")
    with safe_open(file, framework="pt") as fh:
        return fh.get_tensor(key)
