"""A policy's folder: ``policy.json`` (settings), ``heads.safetensors``, ``adapter/`` (the active LoRA
adapter, PEFT format) and ``manifest.json`` (each file's checksum); saving and loading it.

Loading is all or nothing: the manifest, the settings, every tensor's name, shape and finiteness are
checked before any weight of the policy changes, so a damaged or mismatched folder raises an error
naming the file and leaves the policy as it was.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from rllama.errors import CorruptFileError, ModelNotFoundError, RLlamaError
from rllama.fileio import read_json, read_tensors, recover_dir, verify_dir, writing_dir
from rllama.policy.outputs import SCORE_NORMALIZATIONS

POLICY_FILE = "policy.json"


HEADS_FILE = "heads.safetensors"


ADAPTER_DIR = "adapter"


FORMAT_VERSION = 1


class PersistenceMixin:
    """Saving a :class:`~rllama.policy.PolicyModel`'s adapter, heads and settings to a folder, and loading them back."""

    def save(self, path: str | os.PathLike, extra: dict | None = None) -> Path:
        """Write the active adapter and the heads (safetensors), a JSON config and a checksum manifest
        into folder ``path``, atomically."""
        path = Path(path)
        with writing_dir(path) as tmp:
            self.write_into(tmp, extra)
        return path

    def write_into(self, folder: Path, extra: dict | None = None) -> None:
        """Write what :meth:`save` writes into the existing folder ``folder`` (not atomically: for a
        caller that writes more beside it inside one :func:`~rllama.fileio.writing_dir`)."""
        from safetensors.torch import save_file

        self._write_adapter(self.active_adapter, folder / ADAPTER_DIR)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.heads.state_dict().items()},
                  str(folder / HEADS_FILE))
        meta = {
            "format_version": FORMAT_VERSION,
            "base_model": self.base_model_name,
            "hidden_size": self.hidden_size,
            "precision": self.precision,
            "score_normalization": self.score_normalization,
            "temperature": self.temperature,
            "adapter": self.active_adapter,
            "heads": sorted(self.heads.keys()),
            **(extra or {}),
        }
        (folder / POLICY_FILE).write_text(json.dumps(meta, indent=2))

    def load(self, path: str | os.PathLike) -> dict:
        """Load the adapter and head weights saved by :meth:`save` into the active adapter and the
        heads; returns the saved JSON config. Everything is checked first: on any error the policy
        is unchanged."""
        path = recover_dir(path)
        adapter_state, heads_state, meta = self.read_checkpoint(path)
        self.apply_checkpoint(adapter_state, heads_state, meta)
        return meta

    def read_checkpoint(self, path: str | os.PathLike) -> tuple[dict, dict, dict]:
        """Read and check a folder written by :meth:`save` without changing the policy: its adapter
        tensors, head tensors and config, ready for :meth:`apply_checkpoint`."""
        from peft import get_peft_model_state_dict

        path = Path(path)
        meta_file = path / POLICY_FILE
        if not meta_file.is_file():
            raise ModelNotFoundError(f"{str(path)!r} is not an rllama checkpoint: {POLICY_FILE} is missing")
        verify_dir(path)
        meta = read_json(meta_file)
        self._check_settings(meta, meta_file)
        adapter_file = path / ADAPTER_DIR / "adapter_model.safetensors"
        heads_file = path / HEADS_FILE
        for f in (adapter_file, heads_file):
            if not f.is_file():
                raise ModelNotFoundError(f"checkpoint {str(path)!r} is incomplete: {f.name} is missing")
        self._check_adapted_blocks(path)
        expected = get_peft_model_state_dict(self.lm, adapter_name=self.active_adapter)
        adapter_state = _read_tensors(adapter_file, {k: v.shape for k, v in expected.items()}, "this adapter")
        try:
            heads_state = _read_tensors(heads_file, {k: v.shape for k, v in self.heads.state_dict().items()},
                                        "this policy's heads")
        except _Mismatch as exc:
            raise RLlamaError(
                f"checkpoint {str(path)!r} holds heads {meta.get('heads')} that do not match this policy's "
                f"{sorted(self.heads.keys())}: a head with whitening (DQN's and SAC's whiten_features, the "
                f"on-policy policy_head, SAC's actor with train_adapter=False) has another shape than one "
                f"without; build the agent with the algorithm config the checkpoint was trained with (since "
                f"rllama's issue 21 a scoring agent's defaults add these heads: a checkpoint from before needs "
                f"policy_head=0 on-policy, or train_adapter=True and whiten_features=0 for SAC) ({exc})"
            ) from None
        return adapter_state, heads_state, meta

    def apply_checkpoint(self, adapter_state: dict, heads_state: dict, meta: dict) -> None:
        """Put what :meth:`read_checkpoint` returned into the active adapter, the heads and the settings."""
        from peft import set_peft_model_state_dict

        device = self.device
        set_peft_model_state_dict(self.lm, {k: v.to(device) for k, v in adapter_state.items()},
                                  adapter_name=self.active_adapter)
        self.heads.load_state_dict({k: v.to(device) for k, v in heads_state.items()}, strict=True)
        self.score_normalization = meta.get("score_normalization", self.score_normalization)
        self.temperature = float(meta.get("temperature", self.temperature))

    def _check_settings(self, meta: dict, meta_file: Path) -> None:
        if meta.get("hidden_size") != self.hidden_size:
            raise RLlamaError(
                f"checkpoint {str(meta_file.parent)!r} was saved for a model of hidden size {meta.get('hidden_size')}, "
                f"this policy's base model has {self.hidden_size} (base model of the checkpoint: "
                f"{meta.get('base_model')!r})"
            )
        temperature = meta.get("temperature", self.temperature)
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not (
                math.isfinite(temperature) and temperature > 0):
            raise CorruptFileError(f"{meta_file}: temperature={temperature!r}; expected a positive number")
        normalization = meta.get("score_normalization", self.score_normalization)
        if normalization not in SCORE_NORMALIZATIONS:
            raise CorruptFileError(f"{meta_file}: score_normalization={normalization!r}; expected one of "
                                   f"{list(SCORE_NORMALIZATIONS)}")


class _Mismatch(CorruptFileError):
    """A tensor file whose names or shapes are not the policy's."""


def _read_tensors(file: Path, shapes: dict[str, Any], what: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors ``file``, checked: readable, the names and shapes of ``shapes``, finite."""
    tensors = read_tensors(file)
    missing, unexpected = sorted(set(shapes) - set(tensors)), sorted(set(tensors) - set(shapes))
    wrong = sorted(k for k in set(shapes) & set(tensors) if tuple(tensors[k].shape) != tuple(shapes[k]))
    if missing or unexpected or wrong:
        raise _Mismatch(
            f"{file} does not match {what}: missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"other shapes {[(k, tuple(tensors[k].shape), tuple(shapes[k])) for k in wrong[:3]]}"
        )
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CorruptFileError(f"{file}: tensor {name!r} holds NaN or infinite values")
    return tensors
