"""One process of a data-parallel run (launched twice by torchrun in tests/test_distributed.py).

    python -m torch.distributed.run --nproc_per_node 2 tests/workers/data_parallel.py OUT ALGORITHM EPISODES

Rank 1's episodes are three steps long and rank 0's one step, so the processes reach their update
points at different times. Each process writes its final trainable weights and its statistics.
"""

import json
import sys
from pathlib import Path

import gymnasium as gym
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.conftest import ChoiceAgent, ChoiceEnv, make_tiny_lm, make_tokenizer  # noqa: E402


def main() -> None:
    out, algorithm, episodes = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    config = {"batch_episodes": 4}
    if algorithm in ("dqn", "sac"):  # the default: heads on whitened features, the adapter frozen
        config.update(learning_starts=4, gradient_steps=2, minibatch_size=4)
    if algorithm == "ppo":  # the default for a scoring agent: a policy head, the adapter frozen
        config.update(learning_starts=4)
    if algorithm == "grpo":  # the adapter alone
        config.update(group_size=2, policy_head=0)
    agent = ChoiceAgent(make_tiny_lm(), make_tokenizer(), seed=0, precision="fp32", algorithm=algorithm,
                        algorithm_config=config)
    dp = agent.data_parallel
    initial = {f"p{i}": p.detach().clone() for i, p in enumerate(agent.policy.trainable_parameters())}
    steps = 1 if dp.rank == 0 else 3
    env = gym.vector.SyncVectorEnv([lambda: ChoiceEnv(steps=steps)] * 2)
    history = agent.train(env, episodes, seed=0, progress=False)
    final = {f"p{i}": p.detach().clone() for i, p in enumerate(agent.policy.trainable_parameters())}
    # the heads' fitted whitening too: every process must read the features the same way
    buffers = {f"heads.{n}": b.detach().float().clone() for n, b in agent.policy.heads.named_buffers()}
    save_file({**final, **buffers}, str(out / f"rank{dp.rank}.safetensors"))
    changed = sum(float((final[k] - initial[k]).abs().sum()) for k in final)
    (out / f"rank{dp.rank}.json").write_text(json.dumps({
        "rank": dp.rank, "world_size": dp.world_size, "updates": len(history), "changed": changed,
        "steps": agent.total_steps, "episodes": agent.total_episodes,
        "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
