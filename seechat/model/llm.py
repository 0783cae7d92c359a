"""The text expert: any Hugging Face causal LM that accepts inputs_embeds, with its tokenizer.

`llm.name_or_path` may also be a GGUF file (or a folder holding one): it is dequantised once through
transformers' GGUF loader into a safetensors folder in the cache (`gguf_folder`), which later loads read.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from transformers import AddedToken, AutoModelForCausalLM, AutoTokenizer

from ..config import SeeChatConfig
from ..errors import ConfigError
from ..templates import get_template
from .hub import loading


def load_llm(path: str, *, dtype: torch.dtype | None = None, trust_remote_code: bool = False, **kwargs):
    path = gguf_folder(path)
    with loading("text expert", path):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)
    model.eval()
    return model


def load_tokenizer(path: str, *, trust_remote_code: bool = False):
    path = gguf_folder(path)
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
            "chatml, gemma, glm4, llama3, seechat_v1"
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


# -- GGUF text experts ------------------------------------------------------------------------------------
GGUF_SOURCE = "seechat_gguf_source.json"


def gguf_file(path: str) -> Path | None:
    """The GGUF file `path` names (a .gguf file, or a folder holding exactly one and no config.json), else None."""
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        return p
    if p.is_dir() and not (p / "config.json").is_file():
        found = sorted(p.glob("*.gguf"))
        if len(found) > 1:
            raise ConfigError(f"'{path}' holds several GGUF files ({', '.join(f.name for f in found)}): "
                              "give llm.name_or_path the one to use")
        return found[0] if found else None
    return None


def gguf_folder(path: str, out: str | os.PathLike | None = None) -> str:
    """A transformers folder for a GGUF text expert, converted on first use; other paths come back unchanged.

    The folder (config, model.safetensors in fp32, tokenizer with the GGUF's chat template) goes to `out`, or
    to $SEECHAT_CACHE/gguf/<name>-<hash of path, size, mtime> (default ~/.cache/seechat); it records its source
    in seechat_gguf_source.json. A finished folder is reused.
    """
    file = gguf_file(path)
    if file is None:
        return path
    stat = file.stat()
    source = {"gguf": str(file.resolve()), "size": stat.st_size, "mtime": int(stat.st_mtime)}
    if out is None:
        cache = Path(os.environ.get("SEECHAT_CACHE", Path.home() / ".cache" / "seechat"))
        key = hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()[:12]
        out = cache / "gguf" / f"{file.stem}-{key}"
    out = Path(out)
    if (out / GGUF_SOURCE).is_file():
        return str(out)
    try:
        import gguf  # noqa: F401  (transformers' GGUF loader needs it)
    except ImportError as exc:
        raise ConfigError(f"'{file}' is a GGUF file; reading it needs the gguf package: "
                          "pip install 'seechat[real]' (or pip install gguf)") from exc
    tmp = out.with_name(out.name + ".tmp")
    with loading("GGUF text expert", str(file)):
        tokenizer = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
        model = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name, dtype=torch.float32)
    # The dequantised weights are plain tensors now; the GGUF quantisation config would make save_pretrained refuse.
    model.config.quantization_config = None
    del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / GGUF_SOURCE).write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)
    return str(out)
