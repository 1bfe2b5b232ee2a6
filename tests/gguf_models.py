"""Tiny Llama models as GGUF files, written in code with the ``gguf`` package (no download).

The weights are the torch model's own, in float32, laid out as llama.cpp's converter lays them out
(the q/k rows permuted for its rotary embedding); the vocabulary is the tests' byte tokenizer
(``ByT5Tokenizer``: ids 0-2 special, 3-258 the bytes, then extra ids), written as a SentencePiece-style
vocabulary of byte tokens so that llama.cpp turns every token back into its byte.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rllama.backends.gguf import GGUF_NAMES, permute_rows


def _vocab(n: int) -> tuple[list[str], list[int]]:
    tokens, types = [], []
    for i in range(n):
        if i < 3:
            tokens.append(["<pad>", "</s>", "<unk>"][i])
            types.append(2 if i == 2 else 3)  # unknown, control
        elif i < 259:
            tokens.append(f"<0x{i - 3:02X}>")
            types.append(6)  # byte
        else:
            tokens.append(f"<extra_id_{i - 259}>")
            types.append(3)
    return tokens, types


def write_llama_gguf(lm, path: str | Path) -> Path:
    """Write a ``LlamaForCausalLM`` (float32) as a GGUF model file llama.cpp loads."""
    import gguf

    config = lm.config
    path = Path(path)
    writer = gguf.GGUFWriter(str(path), "llama")
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    writer.add_name("rllama-test-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(getattr(config, "rope_theta", None) or config.rope_parameters["rope_theta"]))
    writer.add_rope_dimension_count(config.hidden_size // n_head)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    tokens, types = _vocab(config.vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(False)

    state = {k: v.detach().float().cpu().numpy() for k, v in lm.state_dict().items()}

    def put(name, array):
        writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))

    put("token_embd.weight", state["model.embed_tokens.weight"])
    put("output_norm.weight", state["model.norm.weight"])
    put("output.weight", state.get("lm_head.weight", state["model.embed_tokens.weight"]))
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}"
        put(f"blk.{i}.attn_norm.weight", state[f"{prefix}.input_layernorm.weight"])
        put(f"blk.{i}.ffn_norm.weight", state[f"{prefix}.post_attention_layernorm.weight"])
        for kind, gguf_name in GGUF_NAMES.items():
            group = "self_attn" if kind.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            weight = state[f"{prefix}.{group}.{kind}.weight"]
            if kind == "q_proj":
                weight = permute_rows(weight, n_head)
            elif kind == "k_proj":
                weight = permute_rows(weight, n_kv)
            put(f"blk.{i}.{gguf_name}.weight", weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
