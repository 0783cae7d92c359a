"""`seechat convert seechat-v1`: turn the original SEEChat V1 release's bridge into a seechat model directory.

    seechat convert seechat-v1 --checkpoint models/chatglm-6b/checkpoint_100.pth --out runs/seechat-v1 \\
        [--vision Salesforce/blip2-opt-2.7b] [--qformer Salesforce/blip2-opt-2.7b] \\
        [--llm THUDM/chatglm-6b --trust-remote-code]

The release's checkpoint_100.pth is a torch pickle holding {"model": {"llama_proj.weight": (4096, 768),
"llama_proj.bias": (4096,)}}: the only trained part, a linear layer after BLIP-2's frozen 32-query Q-Former,
in front of ChatGLM-6B. It is read with torch.load(weights_only=True), so a pickle that would run code is refused.
The composition follows V1: ViT-g's last layer (post-layernorm, CLS kept) -> frozen Q-Former -> this linear
layer -> the text expert, with V1's prompt "###Human: <Img>...</Img> 详细描述这张图片 ###Assistant: ".
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..cli_helpers import parse, quiet_hf, setup_logging
from ..config import BridgeConfig, LLMConfig, SeeChatConfig, VisionConfig
from ..errors import ConfigError, ModelDirError

V1_KEYS = ("llama_proj.weight", "llama_proj.bias")


@dataclass
class V1Args:
    checkpoint: str = field(default="", metadata={"help": "The release's checkpoint_100.pth."})
    out: str = field(default="", metadata={"help": "Where the seechat model directory goes."})
    vision: str = field(default="Salesforce/blip2-opt-2.7b",
                        metadata={"help": "A BLIP-2 checkpoint (hub id or path) for the EVA ViT-g."})
    qformer: str = field(default="", metadata={"help": "The BLIP-2 checkpoint of the Q-Former (default: --vision)."})
    llm: str = field(default="THUDM/chatglm-6b", metadata={"help": "The text expert (V1 used ChatGLM-6B, 4096 wide)."})
    chat_template: str = field(default="seechat_v1", metadata={"help": "The prompt format (V1's by default)."})
    trust_remote_code: bool = field(default=False,
                                    metadata={"help": "Needed for ChatGLM-6B, whose code ships with its weights."})


def read_v1_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The llama_proj weights of a V1 checkpoint, read without running any code from the pickle."""
    path = Path(path)
    if not path.is_file():
        raise ModelDirError(f"checkpoint '{path}' does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelDirError(
            f"'{path}' was refused: it is a pickle that needs code to load ({str(exc).splitlines()[0][:200]}); "
            "seechat reads legacy .pth files only with torch.load(weights_only=True). Re-save the state dict "
            "alone, or use safetensors"
        ) from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise ModelDirError(f"'{path}' is not a readable torch checkpoint ({exc})") from exc
    state = data.get("model", data) if isinstance(data, dict) else None
    if not isinstance(state, dict) or not all(k in state for k in V1_KEYS):
        keys = sorted(state)[:8] if isinstance(state, dict) else type(data).__name__
        raise ModelDirError(f"'{path}' is not a SEEChat V1 checkpoint: expected {list(V1_KEYS)} under 'model', "
                            f"found {keys}")
    weight, bias = state["llama_proj.weight"], state["llama_proj.bias"]
    if weight.ndim != 2 or bias.shape != weight.shape[:1]:
        raise ModelDirError(f"'{path}': llama_proj has shapes {tuple(weight.shape)} and {tuple(bias.shape)}")
    return {"proj.weight": weight, "proj.bias": bias}


def v1_config(vision: str, qformer: str, llm: str, chat_template: str = "seechat_v1",
              trust_remote_code: bool = False) -> SeeChatConfig:
    return SeeChatConfig(
        vision=VisionConfig(name_or_path=vision, feature_layer=-1, post_layernorm=True, keep_cls=True),
        bridge=BridgeConfig(type="qformer", qformer_from=qformer or vision, frozen_qformer=True),
        llm=LLMConfig(name_or_path=llm, chat_template=chat_template, trust_remote_code=trust_remote_code),
        image_start="<Img>",
        image_end="</Img>",
    )


def convert(args: V1Args):
    from ..model.checkpoint import build

    weights = read_v1_checkpoint(args.checkpoint)
    config = v1_config(args.vision, args.qformer, args.llm, args.chat_template, args.trust_remote_code)
    model = build(config, device="cpu", dtype="fp32")
    expected = tuple(model.bridge.proj.weight.shape)
    if tuple(weights["proj.weight"].shape) != expected:
        raise ConfigError(
            f"the checkpoint's llama_proj is {tuple(weights['proj.weight'].shape)} (text width x Q-Former width), "
            f"but these experts need {expected}: V1's layer fits a 4096-wide text expert (ChatGLM-6B) after a "
            "768-wide Q-Former"
        )
    model.bridge.proj.load_state_dict({"weight": weights["proj.weight"], "bias": weights["proj.bias"]})
    model.save(args.out)
    return model


def main(argv: list[str]) -> int:
    if not argv or argv[0] != "seechat-v1":
        print("usage: seechat convert seechat-v1 --checkpoint checkpoint_100.pth --out DIR [--vision ...] "
              "[--qformer ...] [--llm ...] [--trust-remote-code]", file=__import__("sys").stderr)
        return 2
    (args,) = parse("seechat convert seechat-v1", argv[1:], V1Args)
    if not args.checkpoint or not args.out:
        raise ConfigError("--checkpoint and --out are required")
    setup_logging()
    quiet_hf()
    convert(args)
    print(f"wrote {args.out}: chat with `seechat chat --model {args.out}`")
    return 0
