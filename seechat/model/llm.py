"""The text expert: any Hugging Face causal LM that accepts inputs_embeds, with its tokenizer."""

from __future__ import annotations

import torch
from transformers import AddedToken, AutoModelForCausalLM, AutoTokenizer

from ..config import SeeChatConfig
from ..errors import ConfigError
from ..templates import get_template
from .hub import loading


def load_llm(path: str, *, dtype: torch.dtype | None = None, trust_remote_code: bool = False, **kwargs):
    with loading("text expert", path):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)
    model.eval()
    return model


def load_tokenizer(path: str, *, trust_remote_code: bool = False):
    with loading("tokenizer", path):
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def prepare_tokenizer(tokenizer, config: SeeChatConfig) -> list[str]:
    """Install the configured chat template and the image token; return the stop tokens.

    Run once when a model is first composed. A saved model directory keeps the result in its
    tokenizer files, so loading it again changes nothing.
    """
    stop = list(config.llm.stop_tokens)
    if config.llm.chat_template:
        entry, source = get_template(config.llm.chat_template)
        vocab = tokenizer.get_vocab()
        missing = [t for t in entry.special_tokens if t not in vocab]
        if missing:
            raise ConfigError(
                f"chat template {config.llm.chat_template!r} writes {missing}, which this tokenizer does not have "
                "as tokens: choose the template that matches the text expert (llm.chat_template)"
            )
        tokenizer.chat_template = source
        stop += [t for t in entry.stop_tokens if t not in stop]
    elif not tokenizer.chat_template:
        raise ConfigError(
            "the text expert's tokenizer has no chat template: set llm.chat_template to one of "
            "chatml, glm4, llama3, seechat_v1"
        )
    if config.image_token not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(config.image_token, special=True, normalized=False)], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return stop


def fit_image_token(llm, image_token_id: int) -> None:
    """Give an image token that lies past the text expert's embedding table a row of its own, set to the mean row.

    The row's input embedding is never used (image embeddings replace it), but with it every id of a prompt is
    inside the vocabulary, so KV reuse, logits processors (repetition_penalty) and exporters need no masking.
    """
    rows = llm.get_input_embeddings().weight.shape[0]
    if image_token_id < rows:
        return
    llm.resize_token_embeddings(image_token_id + 1, mean_resizing=False)
    layers = [llm.get_input_embeddings(), llm.get_output_embeddings()]
    with torch.no_grad():
        for weight in {id(x.weight): x.weight for x in layers if x is not None}.values():
            weight[rows:] = weight[:rows].mean(0, dtype=torch.float32).to(weight.dtype)
        bias = getattr(layers[1], "bias", None)
        if bias is not None and bias.shape[0] > rows:
            bias[rows:] = bias[:rows].mean()


def stop_token_ids(tokenizer, llm, stop_tokens: list[str]) -> list[int]:
    """EOS ids of the tokenizer and the model's generation config, plus the configured stop tokens."""
    ids: list[int] = []
    candidates = [tokenizer.eos_token_id]
    gen_eos = getattr(getattr(llm, "generation_config", None), "eos_token_id", None)
    candidates += gen_eos if isinstance(gen_eos, list) else [gen_eos]
    candidates += tokenizer.convert_tokens_to_ids(stop_tokens) if stop_tokens else []
    for i in candidates:
        if i is not None and i != tokenizer.unk_token_id and i not in ids:
            ids.append(int(i))
    return ids
