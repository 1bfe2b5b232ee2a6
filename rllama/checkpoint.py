"""Training checkpoints that resume exactly.

``save_training_state(agent, folder)`` writes everything the next update depends on:

- ``policy/``: the adapter and heads (safetensors) and their JSON config (:meth:`PolicyModel.save`);
- ``state.safetensors``: the optimizer's tensors, target snapshots, SAC's temperature, and the
  states of torch's global generator, the agent's action-sampling generator and the algorithm's;
- ``state.json``: optimizer hyperparameters, counters, the Python and NumPy random states, the
  experience still buffered (rollout and replay buffers) and the caller's ``extra`` (the runner's
  progress);
- ``memory/``: the episodic memory store, when the agent has one.

Nothing is pickled. The folder is written under a temporary name and renamed into place when
complete, so a crash mid-save never leaves a half-written checkpoint under the final name.
``load_training_state(agent, folder)`` restores all of it into an agent built with the same
configuration; training then continues bit for bit as if it had never stopped (same thread count,
same machine type).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rllama.errors import CorruptFileError, RLlamaError
from rllama.fileio import read_json, read_tensors, recover_dir, verify_dir, writing_dir

FORMAT = "rllama.TrainingState"
# 2: the folder always carries a checksum manifest (states of version 1 may predate manifests).
VERSION = 2
MANIFEST_SINCE = 2
STATE_JSON = "state.json"
STATE_TENSORS = "state.safetensors"


class CheckpointError(CorruptFileError):
    """A checkpoint folder is missing, incomplete, or does not match the agent."""


def _python_rng() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _numpy_rng() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)}


def save_training_state(agent, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Write the agent's full training state to folder ``path`` (replacing it atomically).

    Also invalidates the policy's engine: a run loaded from this state starts with nothing kept, and what
    is kept decides how a forward pass is split (and so its last bits), so the run that saved continues
    exactly as a run resumed from the save does.
    """
    from safetensors.torch import save_file

    if agent.mid_episode:
        raise CheckpointError("save_training_state between episodes only: some environments are mid-episode")
    path = Path(path)
    agent.policy.invalidate()
    with writing_dir(path) as tmp:
        agent.save(tmp / "policy")  # adapter, heads and (under policy/memory) the memory store
        tensors, algorithm_meta = agent.algorithm.state_dict()
        tensors = {f"algorithm.{k}": v.detach().cpu().contiguous() for k, v in tensors.items()}
        tensors["rng.torch"] = torch.get_rng_state()
        agent_tensors, agent_meta = agent.loop_state_dict()
        tensors["rng.agent"] = agent_tensors["rng"]
        save_file(tensors, str(tmp / STATE_TENSORS))
        meta = {
            "format": FORMAT, "version": VERSION,
            "agent_class": f"{type(agent).__module__}.{type(agent).__qualname__}",
            "algorithm": algorithm_meta,
            "agent": agent_meta,
            "rng": {"python": _python_rng(), "numpy": _numpy_rng()},
            "extra": extra or {},
        }
        (tmp / STATE_JSON).write_text(json.dumps(meta))
    return path


def load_training_state(agent, path: str | os.PathLike) -> dict[str, Any]:
    """Restore a state written by :func:`save_training_state`; returns its ``extra``.

    All or nothing: the folder's checksums, ``state.json`` and ``state.safetensors`` are checked
    first, and if restoring fails part-way the agent is put back as it was; either way the error
    names the file at fault."""
    path = recover_dir(path)
    if not (path / STATE_JSON).is_file() or not (path / STATE_TENSORS).is_file():
        raise CheckpointError(f"{str(path)!r} is not a complete rllama training checkpoint "
                              f"({STATE_JSON} or {STATE_TENSORS} is missing)")
    try:
        version = read_json(path / STATE_JSON).get("version")  # whether the folder must have a manifest
        verify_dir(path, required=f"{path / STATE_JSON} has version {version}, whose folders always carry one"
                   if isinstance(version, int) and version >= MANIFEST_SINCE else None,
                   must_list=(STATE_JSON, STATE_TENSORS))
        meta = _read_state(path / STATE_JSON, agent)
        tensors = _read_tensors(path / STATE_TENSORS)
    except CorruptFileError as exc:
        raise CheckpointError(str(exc)) from None
    before = _snapshot(agent)
    try:
        agent.load(path / "policy")
        algorithm_tensors = {k[len("algorithm."):]: v for k, v in tensors.items() if k.startswith("algorithm.")}
        agent.algorithm.load_state_dict(algorithm_tensors, meta["algorithm"])
        agent.load_loop_state_dict({"rng": tensors["rng.agent"]}, meta["agent"])
        torch.set_rng_state(tensors["rng.torch"])
        version, internal, gauss = meta["rng"]["python"]
        random.setstate((version, tuple(internal), gauss))
        n = meta["rng"]["numpy"]
        np.random.set_state((n["name"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    except Exception as exc:
        _restore(agent, before)
        if isinstance(exc, RLlamaError):
            raise
        raise CheckpointError(f"the checkpoint at {str(path)!r} does not fit this agent ({type(exc).__name__}: "
                              f"{exc}); the agent is unchanged") from exc
    return meta["extra"]


def _read_state(file: Path, agent) -> dict[str, Any]:
    meta = read_json(file)
    version = meta.get("version")
    if meta.get("format") != FORMAT or not isinstance(version, int) or isinstance(version, bool) \
            or not 1 <= version <= VERSION:
        raise CheckpointError(f"{file} is not an rllama training state of version 1 to {VERSION} (version "
                              f"{version!r:.20}: a newer one needs a newer rllama)")
    for key, kind in (("algorithm", dict), ("agent", dict), ("rng", dict), ("extra", dict)):
        if not isinstance(meta.get(key), kind):
            raise CheckpointError(f"{file}: {key!r} is missing or not a {kind.__name__}")
    if not isinstance(meta["rng"].get("python"), list) or not isinstance(meta["rng"].get("numpy"), dict):
        raise CheckpointError(f"{file}: the random generators' states are missing")
    if meta["algorithm"].get("name") != agent.algorithm.name:
        raise CheckpointError(
            f"the checkpoint at {str(file.parent)!r} was trained with {meta['algorithm'].get('name')!r}; this agent "
            f"runs {agent.algorithm.name!r}"
        )
    return meta


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    tensors = read_tensors(file)
    missing = [k for k in ("rng.torch", "rng.agent") if k not in tensors]
    if missing:
        raise CheckpointError(f"{file} lacks {missing}")
    return tensors


def _snapshot(agent) -> dict[str, Any]:
    """What :func:`load_training_state` changes in ``agent`` (copies), to put back if it fails part-way."""
    from peft import get_peft_model_state_dict

    policy = agent.policy
    algorithm_tensors, algorithm_meta = agent.algorithm.state_dict()
    loop_tensors, loop_meta = agent.loop_state_dict()
    return {
        "adapter": _clone(get_peft_model_state_dict(policy.lm, adapter_name=policy.active_adapter)),
        "heads": _clone(policy.heads.state_dict()),
        "settings": (policy.score_normalization, policy.temperature, agent.episodic_memory),
        "algorithm": (_clone(algorithm_tensors), json.loads(json.dumps(algorithm_meta))),
        "loop": (_clone(loop_tensors), json.loads(json.dumps(loop_meta))),
    }


def _clone(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in tensors.items()}


def _restore(agent, snapshot: dict[str, Any]) -> None:
    policy = agent.policy
    policy.apply_checkpoint(snapshot["adapter"], snapshot["heads"], {})
    policy.score_normalization, policy.temperature, agent.episodic_memory = snapshot["settings"]
    agent.algorithm.load_state_dict(*snapshot["algorithm"])
    agent.load_loop_state_dict(*snapshot["loop"])
