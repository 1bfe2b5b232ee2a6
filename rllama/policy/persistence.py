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
import shutil
from pathlib import Path
from typing import Any

import torch

from rllama.errors import CorruptFileError, ModelNotFoundError, RLlamaError, warn_user
from rllama.fileio import read_json, read_tensors, verify_dir
from rllama.policy.outputs import SCORE_NORMALIZATIONS

POLICY_FILE = "policy.json"


HEADS_FILE = "heads.safetensors"


ADAPTER_DIR = "adapter"


# 2: every folder carries a checksum manifest (folders of format 1 may predate manifests).
FORMAT_VERSION = 2
MANIFEST_SINCE = 2


def write_policy(policy, folder: Path, extra: dict | None = None) -> None:
    """Write ``policy``'s active adapter, heads and settings into the existing folder ``folder`` (see
    :meth:`~rllama.policy.PolicyModel.write_into`)."""
    from safetensors.torch import save_file

    write_adapter(policy.lm, policy.active_adapter, folder / ADAPTER_DIR)
    save_file({k: v.detach().cpu().contiguous() for k, v in policy.heads.state_dict().items()},
              str(folder / HEADS_FILE))
    meta = {
        "format_version": FORMAT_VERSION,
        "base_model": policy.base_model_name,
        "architecture": _architecture(policy),
        "vocab_size": policy.vocab_size,
        "hidden_size": policy.hidden_size,
        "precision": policy.precision,
        "score_normalization": policy.score_normalization,
        "temperature": policy.temperature,
        "adapter": policy.active_adapter,
        "heads": sorted(policy.heads.keys()),
        **(extra or {}),
    }
    (folder / POLICY_FILE).write_text(json.dumps(meta, indent=2))


def read_checkpoint(policy, path: str | os.PathLike) -> tuple[dict, dict, dict]:
    """Read and check a folder written by :func:`write_policy` without changing ``policy``: its adapter tensors,
    head tensors and config, ready for :func:`apply_checkpoint`."""
    from peft import get_peft_model_state_dict

    path = Path(path)
    meta_file = path / POLICY_FILE
    if not meta_file.is_file():
        raise ModelNotFoundError(f"{str(path)!r} is not an rllama checkpoint: {POLICY_FILE} is missing")
    meta = read_json(meta_file)  # first: its format version says whether the folder must have a manifest
    version = meta.get("format_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CorruptFileError(f"{meta_file}: format_version={version!r}; expected a positive integer")
    if version > FORMAT_VERSION:
        raise RLlamaError(f"{meta_file} has format_version {version}, newer than this rllama reads "
                          f"({FORMAT_VERSION}): upgrade rllama to load it")
    verify_dir(path, required=f"{meta_file} has format_version {version}, whose folders always carry one"
               if version >= MANIFEST_SINCE else None,
               must_list=(POLICY_FILE, HEADS_FILE, f"{ADAPTER_DIR}/adapter_model.safetensors",
                          f"{ADAPTER_DIR}/adapter_config.json"))
    _check_settings(policy, meta, meta_file)
    adapter_file = path / ADAPTER_DIR / "adapter_model.safetensors"
    heads_file = path / HEADS_FILE
    for f in (adapter_file, heads_file):
        if not f.is_file():
            raise ModelNotFoundError(f"checkpoint {str(path)!r} is incomplete: {f.name} is missing")
    check_adapted_blocks(policy.lm, policy.active_adapter, path)
    expected = get_peft_model_state_dict(policy.lm, adapter_name=policy.active_adapter)
    try:
        adapter_state = _read_tensors(adapter_file, {k: v.shape for k, v in expected.items()}, "this adapter")
    except _Mismatch as exc:
        raise CorruptFileError(f"checkpoint {str(path)!r} holds an adapter of other modules or shapes than this "
                               f"policy's ({_models(meta, policy)}): it was trained on another base model or LoRA "
                               f"config; load it into the model it was trained on ({exc})") from None
    try:
        heads_state = _read_tensors(heads_file, {k: v.shape for k, v in policy.heads.state_dict().items()},
                                    "this policy's heads")
    except _Mismatch as exc:
        raise RLlamaError(
            f"checkpoint {str(path)!r} holds heads {meta.get('heads')} that do not match this policy's "
            f"{sorted(policy.heads.keys())}: a head with whitening (DQN's and SAC's whiten_features, the "
            f"on-policy policy_head, SAC's actor with train_adapter=False) has another shape than one "
            f"without; build the agent with the algorithm config the checkpoint was trained with (since "
            f"rllama's issue 21 a scoring agent's defaults add these heads: a checkpoint from before needs "
            f"policy_head=0 on-policy, or train_adapter=True and whiten_features=0 for SAC) ({exc})"
        ) from None
    saved_name, here_name = meta.get("base_model") or "", policy.base_model_name
    if saved_name and here_name and saved_name != here_name:  # last: only what loads gets this warning
        warn_user(f"checkpoint {str(path)!r} was trained on base model {saved_name!r} and is loaded into "
                  f"{here_name!r}: the shapes fit, but the adapter learned another model's features")
    return adapter_state, heads_state, meta


def apply_checkpoint(policy, adapter_state: dict, heads_state: dict, meta: dict) -> None:
    """Put what :func:`read_checkpoint` returned into ``policy``'s active adapter, heads and settings."""
    from peft import set_peft_model_state_dict

    device = policy.device
    set_peft_model_state_dict(policy.lm, {k: v.to(device) for k, v in adapter_state.items()},
                              adapter_name=policy.active_adapter)
    policy.heads.load_state_dict({k: v.to(device) for k, v in heads_state.items()}, strict=True)
    policy.score_normalization = meta.get("score_normalization", policy.score_normalization)
    policy.temperature = float(meta.get("temperature", policy.temperature))


def _architecture(policy) -> str:
    """The base model's ``model_type`` (``"llama"``, ``"gpt2"``...), ``""`` when its config has none."""
    return str(getattr(policy.lm.get_base_model().config, "model_type", "") or "")


def _check_base_model(policy, meta: dict, meta_file: Path) -> None:
    """Refuse a checkpoint whose base model cannot take its adapter and heads (another architecture or
    vocabulary; checkpoints before format 2 record neither). A model of another name with the same
    shapes gets a warning from :func:`read_checkpoint`, once everything else has passed."""
    models = _models(meta, policy)
    for key, kind in (("architecture", str), ("vocab_size", int), ("base_model", str)):
        value = meta.get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise CorruptFileError(f"{meta_file}: {key}={value!r:.60}; expected {kind.__name__} (the file was edited)")
    architecture = meta.get("architecture")
    if architecture and architecture != _architecture(policy):
        raise RLlamaError(f"checkpoint {str(meta_file.parent)!r} was trained on a {architecture!r} model, this "
                          f"policy's base model is a {_architecture(policy)!r} one ({models}): an adapter's modules "
                          "do not carry over between architectures; load it into the model it was trained on")
    vocab = meta.get("vocab_size")
    if vocab is not None and vocab != policy.vocab_size:
        raise RLlamaError(f"checkpoint {str(meta_file.parent)!r} was trained on a model with a vocabulary of {vocab} "
                          f"tokens, this policy's base model has {policy.vocab_size} ({models}): token ids would "
                          "mean other things; load it into the model it was trained on")


def _models(meta: dict, policy) -> str:
    """Both base models, named for an error: the checkpoint's and the policy's."""
    saved_name, here_name = meta.get("base_model") or "", policy.base_model_name
    return f"saved on {saved_name or 'an unnamed model'!r}, loading into {here_name or 'an unnamed model'!r}"


def _check_settings(policy, meta: dict, meta_file: Path) -> None:
    _check_base_model(policy, meta, meta_file)
    if meta.get("hidden_size") != policy.hidden_size:
        raise RLlamaError(
            f"checkpoint {str(meta_file.parent)!r} was saved for a model of hidden size {meta.get('hidden_size')}, "
            f"this policy's base model has {policy.hidden_size} (base model of the checkpoint: "
            f"{meta.get('base_model')!r})"
        )
    temperature = meta.get("temperature", policy.temperature)
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not (
            math.isfinite(temperature) and temperature > 0):
        raise CorruptFileError(f"{meta_file}: temperature={temperature!r}; expected a positive number")
    normalization = meta.get("score_normalization", policy.score_normalization)
    if normalization not in SCORE_NORMALIZATIONS:
        raise CorruptFileError(f"{meta_file}: score_normalization={normalization!r}; expected one of "
                               f"{list(SCORE_NORMALIZATIONS)}")


def _blocks_text(layers) -> str:
    return "every block" if layers is None else f"blocks {sorted(layers)}"


def check_adapted_blocks(lm, adapter: str, path: Path) -> None:
    """A checkpoint whose adapter covers other blocks than ``lm``'s adapter ``adapter`` gets an error saying how to
    match it."""
    config_file = path / ADAPTER_DIR / "adapter_config.json"
    if not config_file.is_file():
        return
    saved = json.loads(config_file.read_text()).get("layers_to_transform")
    ours = getattr(lm.peft_config[adapter], "layers_to_transform", None)
    norm = (lambda v: None if v is None else sorted([v] if isinstance(v, int) else v))
    if norm(saved) != norm(ours):
        layers = "'all'" if saved is None else f"{norm(saved)}"
        raise RLlamaError(
            f"checkpoint {str(path)!r} adapts {_blocks_text(norm(saved))}, this policy adapts "
            f"{_blocks_text(norm(ours))}; build the agent with lora_config=default_lora_config(layers={layers}) "
            "to load it (checkpoints made before rllama adapted the top 8 blocks by default adapt every block)")


def write_adapter(lm, name: str, folder: Path) -> None:
    """Write ``lm``'s adapter ``name`` alone (PEFT format, safetensors) into ``folder``, flat whatever its name."""
    folder.mkdir(parents=True, exist_ok=True)
    lm.save_pretrained(str(folder), selected_adapters=[name], safe_serialization=True)
    found = next((cfg.parent for cfg in sorted(folder.rglob("adapter_config.json"))), None)
    if found is None:
        raise RLlamaError(f"PEFT wrote no adapter_config.json under {folder}")
    if found != folder:  # PEFT nests non-default adapters in a subfolder; keep one flat layout
        for f in found.iterdir():
            shutil.move(str(f), str(folder / f.name))
        shutil.rmtree(found)


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
