"""An LLM agent that learns to play generated TextWorld games, on the embedded default model.

    python examples/textworld.py                      # scoring mode: ranks the admissible commands
    python examples/textworld.py --generate           # free-text commands instead
    python examples/textworld.py --episodes 16        # a quick look

The 96 training episodes train the adapter on long prompts: expect the better part of an hour on 2
CPU cores (an unfinished measurement, README "What the examples cost").

Games come from a small family (3 rooms, 4 objects, quests of 2 commands) generated offline on the
first run and cached (``rllama.envs.textworld_games``). The agent trains on one set of games and is
evaluated on held-out games of the same family: success rate (games won) and score.

``TextWorldAgent`` is the shape of the RLlama README's TextWorld agent: a system prompt, observation
clean-up, command extraction. In scoring mode the env puts the admissible commands into the
observation and ``get_valid_actions`` hands them to the policy; in generate mode the model writes a
command and ``extract_action`` takes its first line. Working memory keeps long episodes' history
within 256 tokens.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: this folder, first on sys.path, holds this file, which would
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # shadow the textworld package; the root replaces it

from rllama.agents import TextWorldAgent
from rllama.envs.textworld_games import GameFamily, make_games

FAMILY = GameFamily(nb_rooms=3, nb_objects=4, quest_length=2)
TRAIN_SEEDS = range(0, 32)
HELD_OUT_SEEDS = range(1000, 1016)

__all__ = ["TextWorldAgent", "make_env", "play_each_game"]


def make_env(seeds, max_episode_steps: int = 20, num_envs: int = 1, **env_kwargs):
    """The family's games of ``seeds`` as an env (or ``num_envs`` vector envs); ``env_kwargs`` go to the env
    (e.g. ``intermediate_reward_weight``)."""
    games = make_games(FAMILY, seeds=seeds, progress=True)
    kwargs = {"games": games, "max_episode_steps": max_episode_steps, "admissible_commands_in_observation": True,
              **env_kwargs}
    # max_episode_steps goes to Gymnasium's TimeLimit wrapper
    if num_envs == 1:
        return gym.make("rllama/TextWorld-v0", **kwargs)
    return gym.make_vec("rllama/TextWorld-v0", num_envs=num_envs, vectorization_mode="sync", **kwargs)


def play_each_game(agent: TextWorldAgent, env, greedy: bool = True, episodes_per_game: int = 1,
                   batch: int = 8) -> dict:
    """``episodes_per_game`` episodes of every game of ``env`` (nothing recorded): success rate and score.

    Episode ``k`` of game ``g`` resets with seed ``100 * g + k``, so agents are compared on the same starts.
    Up to ``batch`` episodes run side by side (copies of ``env``), so the agent scores their commands
    in one batched forward pass; ``won`` and ``scores`` are in (game, k) order whatever the batch.
    """
    jobs = [(game, k) for game in range(len(env.unwrapped.games)) for k in range(episodes_per_game)]
    envs = [env] + [gym.make(env.spec) for _ in range(min(batch, len(jobs)) - 1)]
    won, scores = [0.0] * len(jobs), [0.0] * len(jobs)
    pending = iter(enumerate(jobs))
    running: dict[int, list] = {}  # env id -> [job index, observation, return so far]

    def start(env_id: int) -> None:
        job = next(pending, None)
        if job is not None:
            index, (game, k) = job
            obs, _info = envs[env_id].reset(seed=100 * game + k, options={"game": game})
            running[env_id] = [index, obs, 0.0]

    try:
        with agent.evaluating(greedy=greedy):
            for env_id in range(len(envs)):
                start(env_id)
            while running:
                ids = sorted(running)
                actions = agent.act_batch([running[i][1] for i in ids], env_ids=ids)
                for env_id, action in zip(ids, actions):
                    obs, reward, terminated, truncated, info = envs[env_id].step(action)
                    agent.assign_rewards([reward], env_ids=[env_id])
                    entry = running[env_id]
                    entry[1], entry[2] = obs, entry[2] + reward
                    if terminated or truncated:
                        agent.terminate_episodes([env_id], truncated=[truncated])
                        del running[env_id]
                        won[entry[0]] = float(info["won"])
                        scores[entry[0]] = entry[2] / max(1, info["max_score"])
                        start(env_id)
    finally:
        for extra in envs[1:]:
            extra.close()
    return {"success": float(np.mean(won)), "score": float(np.mean(scores)), "won": won, "n": len(won)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=96, help="training episodes")
    parser.add_argument("--envs", type=int, default=8)
    parser.add_argument("--generate", action="store_true", help="free-text commands instead of scoring")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=None)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default: 1, measured fastest on 2 cores; 0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    # policy_head=0: the adapter trains in both modes, as benchmarks/textworld_heldout.py measures it
    # (the policy head, PPO's default for scoring agents, is unmeasured on TextWorld).
    agent = TextWorldAgent(args.model, seed=args.seed, generate=args.generate,
                           algorithm_config={"batch_episodes": args.envs, "policy_head": 0})
    held_out = make_env(HELD_OUT_SEEDS)
    before = play_each_game(agent, held_out)
    print(f"untrained on {len(HELD_OUT_SEEDS)} held-out games: success {before['success']:.2f}, "
          f"score {before['score']:.2f} ({time.perf_counter() - t0:.0f} s)")
    train_envs = make_env(TRAIN_SEEDS, num_envs=args.envs)
    agent.train(train_envs, args.episodes, seed=args.seed)
    after = play_each_game(agent, held_out)
    print(f"trained on {args.episodes} episodes: success {after['success']:.2f}, score {after['score']:.2f} "
          f"({time.perf_counter() - t0:.0f} s)")
    print("\nlast prompt:\n" + (agent.last_prompt or ""))


if __name__ == "__main__":
    main()
