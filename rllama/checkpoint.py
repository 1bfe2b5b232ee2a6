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

from rllama.errors import RLlamaError
from rllama.fileio import recover_dir, writing_dir

FORMAT = "rllama.TrainingState"
VERSION = 1
STATE_JSON = "state.json"
STATE_TENSORS = "state.safetensors"


class CheckpointError(RLlamaError):
    """A checkpoint folder is missing, incomplete, or does not match the agent."""


def _python_rng() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _numpy_rng() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)}


def save_training_state(agent, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Write the agent's full training state to folder ``path`` (replacing it atomically).

    Also empties the policy's prefix cache: a run loaded from this state starts with an empty one,
    and what is cached decides how a forward pass is split (and so its last bits), so the run that
    saved continues exactly as a run resumed from the save does.
    """
    from safetensors.torch import save_file

    if agent.mid_episode:
        raise CheckpointError("save_training_state between episodes only: some environments are mid-episode")
    path = Path(path)
    agent.policy.clear_prefix_cache()
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
    """Restore a state written by :func:`save_training_state`; returns its ``extra``."""
    from safetensors.torch import load_file

    path = recover_dir(path)
    if not (path / STATE_JSON).is_file() or not (path / STATE_TENSORS).is_file():
        raise CheckpointError(f"{str(path)!r} is not a complete rllama training checkpoint "
                              f"({STATE_JSON} or {STATE_TENSORS} is missing)")
    meta = json.loads((path / STATE_JSON).read_text())
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(f"{path / STATE_JSON} is not an rllama training state of version {VERSION}")
    if meta["algorithm"].get("name") != agent.algorithm.name:
        raise CheckpointError(
            f"the checkpoint at {str(path)!r} was trained with {meta['algorithm'].get('name')!r}; this agent runs "
            f"{agent.algorithm.name!r}"
        )
    agent.load(path / "policy")
    tensors = load_file(str(path / STATE_TENSORS))
    algorithm_tensors = {k[len("algorithm."):]: v for k, v in tensors.items() if k.startswith("algorithm.")}
    agent.algorithm.load_state_dict(algorithm_tensors, meta["algorithm"])
    torch.set_rng_state(tensors["rng.torch"])
    agent.load_loop_state_dict({"rng": tensors["rng.agent"]}, meta["agent"])
    version, internal, gauss = meta["rng"]["python"]
    random.setstate((version, tuple(internal), gauss))
    n = meta["rng"]["numpy"]
    np.random.set_state((n["name"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    return meta["extra"]


