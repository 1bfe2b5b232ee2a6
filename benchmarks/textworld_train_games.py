"""Diagnostic for the TextWorld benchmark's third attempt: its agents on the first 16 *training* games.

    python benchmarks/textworld_train_games.py SEED trained     # the agent saved in .cache/textworld_state_v3
    python benchmarks/textworld_train_games.py SEED untrained   # the base agent

Same agent settings (those of ``textworld_v3``) and the same evaluation protocol as
``textworld_heldout.py`` (greedy: one episode a game; sampled: two), on training games seeds 0-15
instead of the held-out games: did training fit the games it trained on? Prints one JSON line.
``trained`` needs the training state that ``textworld_heldout.py --checkpoint .cache/textworld_state_v3``
left on the machine that ran it.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))
from textworld_heldout import evaluate_agent  # noqa: E402


def main() -> None:
    import torch
    from transformers import AutoConfig

    from examples.textworld import TRAIN_SEEDS, TextWorldAgent, make_env
    from rllama.checkpoint import load_training_state
    from rllama.policy import resolve_model_path
    from rllama.policy.model import default_lora_config

    seed, which = int(sys.argv[1]), sys.argv[2]
    if which not in ("trained", "untrained"):
        raise SystemExit(f"second argument: 'trained' or 'untrained', not {which!r}")
    torch.set_num_threads(1)
    depth = AutoConfig.from_pretrained(resolve_model_path(None)).num_hidden_layers
    agent = TextWorldAgent(None, seed=seed, precision="fp32",
                           lora_config=default_lora_config(layers=range(depth - 8, depth)),
                           algorithm_config={"batch_episodes": 4, "learning_rate": 5e-4, "minibatch_size": 4,
                                             "epochs": 1, "ent_coef": 0.05})
    if which == "trained":
        load_training_state(agent, ROOT.parent / ".cache" / "textworld_state_v3" / f"seed{seed}")
    env = make_env(list(TRAIN_SEEDS)[:16], max_episode_steps=15)
    t0 = time.perf_counter()
    result = evaluate_agent(agent, env, SimpleNamespace(eval_batch=8, sampled_episodes=2))
    print(json.dumps({"seed": seed, "agent": which, "train_games": result, "s": time.perf_counter() - t0}))


if __name__ == "__main__":
    main()
