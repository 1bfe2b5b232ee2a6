"""Data-parallel training: two processes (torchrun, gloo) end every update with identical weights."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def launch(tmp_path, algorithm: str, episodes: int = 16) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           str(ROOT / "tests" / "workers" / "data_parallel.py"), str(tmp_path), algorithm, str(episodes)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("algorithm", ["ppo", "sac", "grpo"])
def test_two_processes_end_with_identical_weights(tmp_path, algorithm):
    stats = launch(tmp_path, algorithm)
    assert [s["rank"] for s in stats] == [0, 1] and all(s["world_size"] == 2 for s in stats)
    # Each process played its own episodes (rank 1's are three times longer) ...
    assert [s["episodes"] for s in stats] == [16, 16]
    assert stats[1]["steps"] == 3 * stats[0]["steps"]
    # ... and they updated together, to the same weights, which moved.
    assert stats[0]["updates"] == stats[1]["updates"] >= 2
    assert stats[0]["changed"] > 0
    w0, w1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2))
    assert w0.keys() == w1.keys()
    for key in w0:
        assert torch.equal(w0[key], w1[key]), key
