"""Resolve expert locations (hub id or path) and turn Hugging Face loading failures into clear errors."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from ..errors import ModelDirError


def resolve(name_or_path: str, base: str | os.PathLike | None = None) -> str:
    """A path relative to a model directory ("./x", "../x") is resolved against `base`; a hub id is kept."""
    if not name_or_path:
        raise ModelDirError("an expert has no name_or_path: set it to a Hugging Face hub id or a local directory")
    if os.path.isabs(name_or_path):
        return name_or_path
    if base is not None and name_or_path.startswith(("./", "../")):
        return str((Path(base) / name_or_path).resolve())
    return name_or_path


def relative_to(path: str, base: str | os.PathLike) -> str:
    """How a model directory at `base` refers to `path`: relative (./ or ../) when local (a folder, or a file such
    as a GGUF text expert), unchanged when a hub id."""
    if not os.path.exists(path):
        return path
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(base))
    return rel if rel.startswith("..") else "./" + rel


@contextlib.contextmanager
def loading(what: str, name_or_path: str):
    """Wrap a from_pretrained call so that a missing or broken checkpoint gives one actionable line."""
    try:
        yield
    except (OSError, ValueError, KeyError) as exc:
        if os.path.isdir(name_or_path):
            hint = f"the directory exists but is not a valid {what} checkpoint ({_first_line(exc)})"
        elif name_or_path.startswith((os.sep, ".")) or name_or_path.count("/") != 1:
            hint = "no such directory"
        else:
            hint = (
                "there is no such local directory, and as a Hugging Face hub id it is not in the local cache "
                f"({_first_line(exc)}); download it on a machine with network "
                f"(`hf download {name_or_path}`) or pass a local path"
            )
        raise ModelDirError(f"cannot load the {what} '{name_or_path}': {hint}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
