"""A policy's folder: ``policy.json`` (settings), ``heads.safetensors`` and ``adapter/`` (PEFT); saving and
loading it."""

from __future__ import annotations

import json
import os
from pathlib import Path

from rllama.errors import ModelNotFoundError, RLlamaError
from rllama.fileio import recover_dir, writing_dir

POLICY_FILE = "policy.json"


HEADS_FILE = "heads.safetensors"


ADAPTER_DIR = "adapter"


FORMAT_VERSION = 1


class PersistenceMixin:
    """Saving a :class:`~rllama.policy.PolicyModel`'s adapter, heads and settings to a folder, and loading them back."""

    def save(self, path: str | os.PathLike, extra: dict | None = None) -> Path:
        """Write the adapter and heads (safetensors) and a JSON config into folder ``path``, atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        with writing_dir(path) as tmp:
            self.lm.save_pretrained(str(tmp / ADAPTER_DIR), safe_serialization=True)
            save_file({k: v.detach().cpu().contiguous() for k, v in self.heads.state_dict().items()},
                      str(tmp / HEADS_FILE))
            meta = {
                "format_version": FORMAT_VERSION,
                "base_model": self.base_model_name,
                "hidden_size": self.hidden_size,
                "precision": self.precision,
                "score_normalization": self.score_normalization,
                "temperature": self.temperature,
                "heads": sorted(self.heads.keys()),
                **(extra or {}),
            }
            (tmp / POLICY_FILE).write_text(json.dumps(meta, indent=2))
        return path

    def load(self, path: str | os.PathLike) -> dict:
        """Load adapter and head weights saved by :meth:`save`; returns the saved JSON config."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        path = recover_dir(path)
        meta_file = path / POLICY_FILE
        if not meta_file.is_file():
            raise ModelNotFoundError(f"{str(path)!r} is not an rllama checkpoint: {POLICY_FILE} is missing")
        meta = json.loads(meta_file.read_text())
        if meta.get("hidden_size") != self.hidden_size:
            raise RLlamaError(
                f"checkpoint {str(path)!r} was saved for a model of hidden size {meta.get('hidden_size')}, "
                f"this policy's base model has {self.hidden_size} (base model of the checkpoint: "
                f"{meta.get('base_model')!r})"
            )
        adapter_file = path / ADAPTER_DIR / "adapter_model.safetensors"
        heads_file = path / HEADS_FILE
        for f in (adapter_file, heads_file):
            if not f.is_file():
                raise ModelNotFoundError(f"checkpoint {str(path)!r} is incomplete: {f.name} is missing")
        self._check_adapted_blocks(path)
        result = set_peft_model_state_dict(self.lm, load_file(str(adapter_file), device=str(self.device)))
        missing_lora = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
        if missing_lora or getattr(result, "unexpected_keys", []):
            raise RLlamaError(
                f"checkpoint {str(path)!r} does not match this adapter: missing {missing_lora[:3]}, "
                f"unexpected {list(getattr(result, 'unexpected_keys', []))[:3]}"
            )
        try:
            self.heads.load_state_dict(load_file(str(heads_file), device=str(self.device)), strict=True)
        except RuntimeError as e:
            raise RLlamaError(
                f"checkpoint {str(path)!r} holds heads {meta.get('heads')} that do not match this policy's "
                f"{sorted(self.heads.keys())}: a head with whitening (DQN's and SAC's whiten_features, the "
                f"on-policy policy_head, SAC's actor with train_adapter=False) has another shape than one "
                f"without; build the agent with the algorithm config the checkpoint was trained with (since "
                f"rllama's issue 21 a scoring agent's defaults add these heads: a checkpoint from before needs "
                f"policy_head=0 on-policy, or train_adapter=True and whiten_features=0 for SAC) "
                f"({str(e).splitlines()[0]})"
            ) from None
        self.score_normalization = meta.get("score_normalization", self.score_normalization)
        self.temperature = float(meta.get("temperature", self.temperature))
        return meta
