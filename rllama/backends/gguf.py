"""LoRA adapters as llama.cpp reads them: a PEFT adapter written as a GGUF adapter file.

llama.cpp applies a LoRA adapter at run time beside the (quantised) base weights, ``W x + s B (A x)``.
Its adapter files hold, per adapted linear layer, two tensors named after the base tensor
(``blk.3.attn_q.weight.lora_a`` and ``.lora_b``), PEFT's ``A`` (rank × in) and ``B`` (out × rank) as
they are, with two differences this module takes care of:

- llama.cpp's converter stores a Llama model's ``q_proj`` and ``k_proj`` rows permuted (its rotary
  embedding pairs neighbouring dimensions, transformers' pairs the two halves); the ``B`` rows of
  those layers get the same permutation, or their part of the adapter acts on the wrong dimensions;
- PEFT's scale (``lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA, per layer) is folded into ``B``,
  and the file's ``adapter.lora.alpha`` is 0, which llama.cpp reads as "scale 1".
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rllama.errors import RLlamaError

GGUF_NAMES = {
    "q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
    "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down",
}
"""transformers' Llama-family linear layers → llama.cpp's tensor names."""

PERMUTED_ARCHITECTURES = ("llama",)
"""GGUF architectures whose converter permutes the q/k rows (Qwen2's, for one, does not)."""

_BLOCK = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)$")


def permute_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """The row order llama.cpp's converter gives a Llama ``q_proj``/``k_proj`` weight of ``n_head`` heads:
    within each head, the two halves of the rotary dimensions interleaved."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def lora_tensors(lm: nn.Module, adapter: str, architecture: str = "llama") -> dict[str, np.ndarray]:
    """``{gguf tensor name: float32 array}`` of ``adapter``'s LoRA weights in ``lm`` (a PEFT model).

    Raises :class:`~rllama.errors.RLlamaError` naming the layer when the adapter holds something a
    llama.cpp adapter cannot: a layer outside the transformer blocks' linear layers (``lm_head``,
    embeddings), DoRA, or extra trained modules.
    """
    config = lm.get_base_model().config if hasattr(lm, "get_base_model") else lm.config
    heads = {"q_proj": int(config.num_attention_heads),
             "k_proj": int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)}
    permute = architecture in PERMUTED_ARCHITECTURES
    peft_config = getattr(lm, "peft_config", {}).get(adapter)
    if peft_config is not None and getattr(peft_config, "modules_to_save", None):
        raise RLlamaError(f"adapter {adapter!r} also trains whole modules {list(peft_config.modules_to_save)} "
                          "(modules_to_save), which a llama.cpp LoRA adapter cannot carry; use the in-process backend")
    out: dict[str, np.ndarray] = {}
    for name, module in lm.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if not isinstance(lora_a, nn.ModuleDict) or adapter not in lora_a:
            continue
        match = _BLOCK.search(name)
        kind = match.group(2) if match else None
        if kind not in GGUF_NAMES:
            raise RLlamaError(f"adapter {adapter!r} adapts {name!r}, which has no llama.cpp counterpart (LoRA on "
                              f"the blocks' {', '.join(GGUF_NAMES)} layers only); use the in-process backend or "
                              "a lora_config without it")
        if getattr(module, "use_dora", {}).get(adapter, False):
            raise RLlamaError(f"adapter {adapter!r} uses DoRA on {name!r}, which llama.cpp does not run")
        a = lora_a[adapter].weight.detach().float().cpu()
        b = module.lora_B[adapter].weight.detach().float().cpu() * float(module.scaling[adapter])
        a_np, b_np = a.numpy().copy(), b.numpy().copy()
        if permute and kind in heads:
            b_np = permute_rows(b_np, heads[kind])
        base = f"blk.{int(match.group(1))}.{GGUF_NAMES[kind]}.weight"
        out[f"{base}.lora_a"] = np.ascontiguousarray(a_np, dtype=np.float32)
        out[f"{base}.lora_b"] = np.ascontiguousarray(b_np, dtype=np.float32)
    if not out:
        raise RLlamaError(f"adapter {adapter!r} has no LoRA layers in this model")
    return out


def write_lora_gguf(lm: nn.Module, adapter: str, path: str | os.PathLike, architecture: str = "llama") -> Path:
    """Write ``adapter``'s weights in ``lm`` as a llama.cpp LoRA adapter at ``path`` (see the module's notes)."""
    import gguf

    tensors = lora_tensors(lm, adapter, architecture)
    path = Path(path)
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", 0.0)  # scales are folded into B: llama.cpp applies scale 1
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@torch.no_grad()
def adapter_is_zero(lm: nn.Module, adapter: str) -> bool:
    """Whether ``adapter`` adds nothing (every ``B`` zero, as a fresh LoRA adapter is)."""
    for module in lm.modules():
        lora_b = getattr(module, "lora_B", None)
        if isinstance(lora_b, nn.ModuleDict) and adapter in lora_b and lora_b[adapter].weight.any():
            return False
    return True
