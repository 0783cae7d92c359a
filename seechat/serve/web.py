"""A web page over one chat engine (Gradio): upload an image, chat about it, answers stream.

    seechat web --model runs/toyworld/model                 # http://127.0.0.1:7860
    seechat web --model DIR --host 127.0.0.1 --port 7860 --max-new-tokens 256

The image is attached to the next question; a newly uploaded image joins the same conversation, as
`/image` does in the terminal. 新图片 New image starts over without an image; 清空对话 Clear chat forgets the
history and attaches the current image again to the next question. An answer with boxes
(`<ref>..</ref><box>(x1,y1),(x2,y2)</box>`, seechat.boxes) is shown beside the chat as the picture with those
boxes and their labels (框 Boxes). Everything is served from this machine: no analytics, no fonts or scripts
from a CDN.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from ..chat.engine import ChatEngine, Conversation, GenerationSettings
from ..cli import LoadArgs, load_model, parse, setup_logging
from ..data.images import load_image
from ..errors import ConfigError, SeeChatError

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

log = logging.getLogger("seechat")

TITLE = "一见 SEEChat"
DEFAULT_QUESTION = "详细描述这张图片"


@dataclass
class WebArgs:
    """Where the page listens."""

    host: str = field(default="127.0.0.1", metadata={"help": "Address to listen on (loopback by default)."})
    port: int = field(default=7860, metadata={"help": "Port to listen on."})
    max_image_mb: float = field(default=20.0, metadata={"help": "Largest image upload, in MB."})
    max_queue: int = field(default=16, metadata={"help": "Most questions waiting for the model at once."})

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError("port must be in 0..65535")
        if self.max_image_mb <= 0 or self.max_queue < 1:
            raise ConfigError("max_image_mb must be > 0 and max_queue >= 1")


@dataclass
class Session:
    """One browser tab's conversation and which image it has already seen."""

    conversation: Conversation
    attached: str | None = None
    """The path of the image last sent with a question; a different one in the image box is sent next."""


class WebChat:
    """The page's event handlers over one engine (plain functions of the page's values, so tests call them)."""

    def __init__(self, engine: ChatEngine):
        self.engine = engine

    def respond(self, text, history, session, image_path, max_new_tokens, temperature, top_p, top_k,
                repetition_penalty, seed):
        """Stream one answer into the chat: yields (chat, question box, session, stats line).
        An error shows as a notice and leaves the chat as it was."""
        import gradio as gr

        text = (text or "").strip() or (DEFAULT_QUESTION if image_path else "")
        history = list(history or [])
        if not text:
            yield history, "", session, ""
            return
        session = session or Session(self.engine.conversation())
        try:
            settings = GenerationSettings(
                max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_p=float(top_p),
                top_k=int(top_k), repetition_penalty=float(repetition_penalty),
                seed=None if seed is None or int(seed) < 0 else int(seed),
            )
            new_image = image_path if image_path and image_path != session.attached else None
            image = load_image(new_image, name="the uploaded image") if new_image else None
        except SeeChatError as exc:
            gr.Warning(str(exc))
            yield history, text, session, ""
            return
        shown = history + ([{"role": "user", "content": {"path": new_image}}] if new_image else [])
        shown = shown + [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]
        answer = ""
        try:
            for piece in session.conversation.stream(text, image=image, settings=settings):
                answer += piece
                shown[-1] = {"role": "assistant", "content": answer}
                yield shown, "", session, ""
        except SeeChatError as exc:
            gr.Warning(str(exc))
            yield history, text, session, ""
            return
        if new_image:
            session.attached = new_image
        reply = session.conversation.last_reply
        shown[-1] = {"role": "assistant", "content": reply.text}
        finish = {"stop": "完 done", "length": "到达上限 hit max tokens"}.get(reply.finish_reason, reply.finish_reason)
        yield shown, "", session, f"{reply.seconds:.1f} 秒 s · {reply.completion_tokens} 词元 tokens · {finish}"

    @staticmethod
    def new_image():
        """Start over: no image, no history."""
        return None, [], None, "", ""

    @staticmethod
    def clear_chat(session):
        """Forget the history; the image in the box goes with the next question again."""
        if session is not None:
            session.conversation.reset()
            session.attached = None
        return [], session, ""


def answer_boxes(session, image_path):
    """The picture with the last answer's boxes and labels, for gr.AnnotatedImage (None when it has none)."""
    from PIL import Image

    from ..boxes import parse_boxes

    reply = session.conversation.last_reply if session is not None else None
    found = parse_boxes(reply.text) if reply is not None else []
    if not found or not image_path:
        return None
    try:
        width, height = Image.open(image_path).size
    except OSError:
        return None
    spans = [(tuple(round(v) for v in b.to_pixels(width, height)), b.ref or f"#{k + 1}") for k, b in enumerate(found)]
    return image_path, spans


def build_page(engine: ChatEngine, defaults: GenerationSettings | None = None):
    """The Gradio Blocks page over `engine` (launch it yourself, or use `main`)."""
    import gradio as gr

    defaults = defaults or GenerationSettings()
    chat = WebChat(engine)

    with gr.Blocks(title=TITLE, analytics_enabled=False) as page:
        gr.Markdown(f"## {TITLE}\n上传一张图片，然后提问。 Upload an image, then ask about it.")
        session = gr.State(None)
        with gr.Row():
            with gr.Column(scale=2):
                image = gr.Image(label="图片 Image", type="filepath", format="png", sources=["upload", "clipboard"],
                                 height=300, buttons=["fullscreen"], elem_id="image")
                boxes = gr.AnnotatedImage(label="框 Boxes", height=300, elem_id="boxes")
                with gr.Row():
                    new_btn = gr.Button("新图片 New image", elem_id="new-image")
                    clear_btn = gr.Button("清空对话 Clear chat", elem_id="clear")
                with gr.Accordion("生成设置 Generation settings", open=False):
                    max_new = gr.Slider(1, 2048, value=defaults.max_new_tokens, step=1,
                                        label="最多生成词元 Max new tokens")
                    temperature = gr.Slider(0, 2, value=defaults.temperature, step=0.05,
                                            label="温度 Temperature (0 = 贪心 greedy)")
                    top_p = gr.Slider(0.05, 1, value=defaults.top_p, step=0.05, label="核采样 Top-p")
                    top_k = gr.Slider(0, 200, value=defaults.top_k, step=1, label="Top-k (0 = 不限 no limit)")
                    repetition = gr.Slider(0.5, 2, value=defaults.repetition_penalty, step=0.05,
                                           label="重复惩罚 Repetition penalty")
                    seed = gr.Number(value=-1 if defaults.seed is None else defaults.seed, precision=0,
                                     label="随机种子 Seed (-1 = 随机 random)")
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="对话 Chat", height=460, buttons=["copy", "copy_all"], elem_id="chat")
                question = gr.Textbox(label="问题 Question", placeholder=f"{DEFAULT_QUESTION} · Describe this image",
                                      elem_id="question")
                send = gr.Button("发送 Send", variant="primary", elem_id="send")
                stats = gr.Markdown(elem_id="stats")
        inputs = [question, chatbot, session, image, max_new, temperature, top_p, top_k, repetition, seed]
        outputs = [chatbot, question, session, stats]
        send.click(chat.respond, inputs, outputs).then(answer_boxes, [session, image], [boxes])
        question.submit(chat.respond, inputs, outputs).then(answer_boxes, [session, image], [boxes])
        new_btn.click(chat.new_image, None, [image, chatbot, session, question, stats], queue=False)
        clear_btn.click(chat.clear_chat, [session], [chatbot, session, stats], queue=False)
    return page


def main(argv: list[str]) -> int:
    load_args, args, defaults = parse(
        "seechat web", argv, LoadArgs, WebArgs, GenerationSettings, description=__doc__.split("\n")[0]
    )
    setup_logging()
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("the page listens on %s: anyone who can reach this address can use the model", args.host)
    engine = ChatEngine(load_model(load_args))
    page = build_page(engine, defaults)
    page.queue(default_concurrency_limit=1, max_size=args.max_queue)  # one engine: answers take turns
    log.info("web page at http://%s:%d", args.host, args.port)
    page.launch(server_name=args.host, server_port=args.port, share=False, inbrowser=False, ssr_mode=False,
                pwa=False, mcp_server=False, show_error=True, max_file_size=f"{args.max_image_mb:g}mb", quiet=True,
                footer_links=[])
    return 0
