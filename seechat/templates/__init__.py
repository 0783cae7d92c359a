"""Built-in chat templates (Jinja, with {% generation %} blocks so the loss mask comes from the same render).

A model directory stores the template it uses in its tokenizer files; these names are only used when
a model is first composed (`llm.chat_template`), never guessed from a model's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

from ..errors import ConfigError


@dataclass(frozen=True)
class Template:
    file: str
    special_tokens: tuple[str, ...]
    """Tokens the template writes; the tokenizer must already have each as one token."""
    stop_tokens: tuple[str, ...]
    """Tokens that end an answer."""


TEMPLATES = {
    "chatml": Template("chatml.jinja", ("<|im_start|>", "<|im_end|>"), ("<|im_end|>",)),
    "glm4": Template(
        "glm4.jinja",
        ("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|endoftext|>"),
        ("<|endoftext|>", "<|user|>"),
    ),
    "gemma": Template("gemma.jinja", ("<start_of_turn>", "<end_of_turn>"), ("<end_of_turn>",)),
    "llama3": Template("llama3.jinja", ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), ("<|eot_id|>",)),
    "seechat_v1": Template("seechat_v1.jinja", (), ()),
}


def get_template(name: str) -> tuple[Template, str]:
    """The template entry and its Jinja source."""
    if name not in TEMPLATES:
        raise ConfigError(f"unknown chat template {name!r}; built-in templates are {sorted(TEMPLATES)}")
    entry = TEMPLATES[name]
    source = resources.files(__package__).joinpath(entry.file).read_text(encoding="utf-8")
    return entry, source
