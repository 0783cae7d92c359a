"""seechat (一见): stitch a pretrained vision expert and a chat LLM into a multimodal chat model.

    import seechat
    model = seechat.load("runs/toyworld/model")
    engine = seechat.ChatEngine(model)
    print(engine.ask("picture.png", "详细描述这张图片"))
"""

import os as _os

_os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from .config import BridgeConfig, LLMConfig, SeeChatConfig, VisionConfig  # noqa: E402
from .errors import SeeChatError  # noqa: E402
from .model.checkpoint import build, load  # noqa: E402
from .model.seechat import SeeChat  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "BridgeConfig", "LLMConfig", "SeeChatConfig", "VisionConfig", "SeeChat", "SeeChatError", "build", "load",
    "ChatEngine", "GenerationSettings", "__version__",
]


def __getattr__(name):  # the chat engine pulls in threading/streaming code only when asked for
    if name in ("ChatEngine", "GenerationSettings", "Conversation"):
        from .chat import engine

        return getattr(engine, name)
    raise AttributeError(name)
