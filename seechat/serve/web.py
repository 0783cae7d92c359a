"""A web page over one chat engine (Gradio): upload an image, chat about it, answers stream.

    seechat web --model runs/toyworld/model                 # http://127.0.0.1:7860
    seechat web --model DIR --host 127.0.0.1 --port 7860 --max-new-tokens 256

The image is attached to the next question; a newly uploaded image joins the same conversation, as
`/image` does in the terminal. 新图片 New image starts over without an image; 清空对话 Clear chat forgets the
history and attaches the current image again to the next question; both stop an answer that is still
streaming first. Each tab's conversation (its KV cache and images) is freed after --session-idle-minutes
without a question, and when more than --max-sessions tabs are open, the longest idle goes first.
An answer with boxes (`<ref>..</ref><box>(x1,y1),(x2,y2)</box>`, seechat.boxes) is shown beside the chat
as the picture with those boxes and their labels (框 Boxes).
Everything is served from this machine: no analytics, no fonts or scripts from a CDN.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from ..chat.engine import ChatEngine, Conversation, GenerationSettings
from ..cli_helpers import LoadArgs, load_model, parse, setup_logging
from ..data.images import load_image, needed_side
from ..errors import ConfigError, SeeChatError
from .scheduler import WAIT_STEPS, QueueFull, Scheduler

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
    max_batch: int = field(
        default=8, metadata={"help": "Most answers generated together (1: one at a time); more join between steps."}
    )
    batch_wait_steps: int = field(
        default=WAIT_STEPS, metadata={"help": "Most decoding steps a new question waits for others before it joins "
                                              "the answers being generated (0: at once)."}
    )
    session_idle_minutes: float = field(
        default=30.0, metadata={"help": "A tab's conversation is freed after this many minutes without a question."}
    )
    max_sessions: int = field(default=64, metadata={"help": "Most conversations kept; more free the longest idle."})

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError("port must be in 0..65535")
        if self.max_image_mb <= 0 or self.max_queue < 1 or self.max_batch < 1 or self.batch_wait_steps < 0:
            raise ConfigError("max_image_mb must be > 0, max_queue >= 1, max_batch >= 1 and batch_wait_steps >= 0")
        if self.session_idle_minutes <= 0 or self.max_sessions < 1:
            raise ConfigError("session_idle_minutes must be > 0 and max_sessions >= 1")


@dataclass
class Session:
    """One browser tab's conversation and which image it has already seen."""

    conversation: Conversation
    attached: str | None = None
    """The path of the image last sent with a question; a different one in the image box is sent next."""
    last_used: float = 0.0
    closed: bool = False
    """Freed (expired, evicted, or left by New image): its conversation is empty and it is not used again."""
    stop: threading.Event = field(default_factory=threading.Event)
    """Set to stop the answer now streaming (a new event for each question)."""

    def clear(self) -> None:
        """Stop a streaming answer and forget the history, its images and KV cache. The conversation object is
        replaced rather than reset, so the stopped stream, which restores its own conversation as it ends,
        cannot bring the old history back."""
        self.stop.set()
        self.conversation = self.conversation.engine.conversation()
        self.attached = None

    def close(self) -> None:
        self.clear()
        self.closed = True


class Sessions:
    """The page's open conversations: each is freed after `idle_seconds` without a question, and beyond
    `max_sessions` the longest idle is freed first. Checked whenever a question comes in."""

    def __init__(self, engine: ChatEngine, *, idle_seconds: float = 1800.0, max_sessions: int = 64,
                 clock=time.monotonic):
        self.engine, self.idle_seconds, self.max_sessions, self.clock = engine, idle_seconds, max_sessions, clock
        self._open: OrderedDict[int, Session] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._open)

    def use(self, session: Session | None) -> Session:
        """The session for a question: this one, refreshed, or a new one when it is None or was freed."""
        with self._lock:
            self._sweep()
            if session is None or session.closed:
                session = Session(self.engine.conversation())
            session.last_used = self.clock()
            self._open[id(session)] = session
            self._open.move_to_end(id(session))
            while len(self._open) > self.max_sessions:
                self._open.popitem(last=False)[1].close()
            return session

    def drop(self, session: Session | None) -> None:
        """Free a session now (the tab left the page, or New image)."""
        if session is not None:
            session.close()
            with self._lock:
                self._open.pop(id(session), None)

    def _sweep(self) -> None:
        now = self.clock()
        for key, session in list(self._open.items()):
            if session.closed or now - session.last_used > self.idle_seconds:
                del self._open[key]
                session.close()


class WebChat:
    """The page's event handlers over one engine (plain functions of the page's values, so tests call them)."""

    def __init__(self, engine: ChatEngine, sessions: Sessions | None = None):
        self.engine = engine
        self.sessions = Sessions(engine) if sessions is None else sessions
        self.min_side = needed_side(engine.model.processor.image_processor)  # uploads decode toward this size

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
        used = self.sessions.use(session)
        if used is not session and session is not None and history:  # it expired: the chat starts over
            gr.Warning("这段对话闲置太久，已被清除，请重新开始。 This conversation was idle too long and was cleared; "
                       "it starts over.")
            history = []
        session = used
        try:
            settings = GenerationSettings(
                max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_p=float(top_p),
                top_k=int(top_k), repetition_penalty=float(repetition_penalty),
                seed=None if seed is None or int(seed) < 0 else int(seed),
            )
            new_image = image_path if image_path and image_path != session.attached else None
            image = load_image(new_image, name="the uploaded image", min_side=self.min_side) if new_image else None
        except SeeChatError as exc:
            gr.Warning(str(exc))
            yield history, text, session, ""
            return
        shown = history + ([{"role": "user", "content": {"path": new_image}}] if new_image else [])
        shown = shown + [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]
        answer, stop = "", threading.Event()
        session.stop = stop
        stream = session.conversation.stream(text, image=image, settings=settings)
        try:
            for piece in stream:
                if stop.is_set():
                    break
                answer += piece
                shown[-1] = {"role": "assistant", "content": answer}
                yield shown, "", session, ""
        except (SeeChatError, QueueFull) as exc:
            gr.Warning(str(exc))
            yield history, text, session, ""
            return
        finally:
            stream.close()  # a stopped answer: the model stops at its next token and is free for others
        if stop.is_set():  # Clear chat, New image or expiry came during the answer: the page shows the cleared chat
            yield [], "", None if session.closed else session, ""
            return
        if new_image:
            session.attached = new_image
        reply = session.conversation.last_reply
        shown[-1] = {"role": "assistant", "content": reply.text}
        finish = {"stop": "完 done", "length": "到达上限 hit max tokens"}.get(reply.finish_reason, reply.finish_reason)
        yield shown, "", session, f"{reply.seconds:.1f} 秒 s · {reply.completion_tokens} 词元 tokens · {finish}"

    def new_image(self, session=None):
        """Start over: no image, no history (an answer still streaming stops first, and the session is freed)."""
        self.sessions.drop(session)
        return None, [], None, "", ""

    @staticmethod
    def clear_chat(session):
        """Forget the history (an answer still streaming stops first); the image in the box goes with the next
        question again."""
        if session is not None:
            session.clear()
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


def build_page(engine: ChatEngine, defaults: GenerationSettings | None = None, args: WebArgs | None = None):
    """The Gradio Blocks page over `engine` (launch it yourself, or use `main`)."""
    import gradio as gr

    defaults, args = defaults or GenerationSettings(), args or WebArgs()
    idle = args.session_idle_minutes * 60
    chat = WebChat(engine, Sessions(engine, idle_seconds=idle, max_sessions=args.max_sessions))

    with gr.Blocks(title=TITLE, analytics_enabled=False) as page:
        gr.Markdown(f"## {TITLE}\n上传一张图片，然后提问。 Upload an image, then ask about it.")
        # Gradio also deletes a closed tab's state, and this one after `idle` seconds: both free the session
        session = gr.State(None, time_to_live=idle, delete_callback=chat.sessions.drop)
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
        new_btn.click(chat.new_image, [session], [image, chatbot, session, question, stats], queue=False)
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
    # every tab's answers go through one scheduler: they decode together, up to max_batch (continuous batching)
    engine.runner = Scheduler(engine, max_queue=args.max_queue, max_batch=args.max_batch,
                              wait_steps=args.batch_wait_steps)
    page = build_page(engine, defaults, args)
    page.queue(default_concurrency_limit=args.max_batch, max_size=args.max_queue)
    log.info("web page at http://%s:%d", args.host, args.port)
    page.launch(server_name=args.host, server_port=args.port, share=False, inbrowser=False, ssr_mode=False,
                pwa=False, mcp_server=False, show_error=True, max_file_size=f"{args.max_image_mb:g}mb", quiet=True,
                footer_links=[])
    return 0
