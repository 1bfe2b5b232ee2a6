"""Episodic memory on a task where past episodes hold the answer: which door leaves each room.

    python examples/memory_rooms.py                 # trains with memory, prints what it retrieved
    python examples/memory_rooms.py --no-memory     # the same without memory

``RoomsEnv`` puts the agent in one of 16 rooms per episode; each room has one exit among four
coloured doors, fixed for the whole run (drawn from the seed) and not guessable from the text. An
episode is one choice: reward 1 for the exit, 0 otherwise. A model can only learn the answers by
remembering them: in its adapter's weights (RL alone), or in episodic memory, which here keeps the
successful episodes and recalls the ones of the same room into the prompt::

    memory = EpisodicMemory(k=1, min_similarity=0.95, write_filter=lambda e: e.episode_return > 0)
    agent = RoomsAgent(memory=memory)

``benchmarks/memory_ablation.py`` measures success with and without memory over several seeds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rllama import RLlamaAgent
from rllama.memory import EpisodicMemory

ROOMS = ["kitchen", "library", "garage", "attic", "cellar", "studio", "chapel", "garden",
         "office", "bakery", "museum", "tunnel", "harbor", "market", "stable", "tower"]
DOORS = ["red", "blue", "green", "yellow"]


class RoomsEnv(gym.Env):
    """One-step episodes: observation = a room index, action = a door index, reward 1 at the exit.

    Args:
        n_rooms: how many of ``ROOMS`` are used.
        world_seed: draws each room's exit door (the same for every episode of a run).
    """

    metadata = {"render_modes": []}

    def __init__(self, n_rooms: int = 16, world_seed: int = 0) -> None:
        if not 1 <= n_rooms <= len(ROOMS):
            raise ValueError(f"n_rooms={n_rooms}; expected 1..{len(ROOMS)}")
        self.n_rooms = n_rooms
        self.exits = np.random.default_rng(world_seed).integers(len(DOORS), size=n_rooms)
        self.observation_space = spaces.Discrete(n_rooms)
        self.action_space = spaces.Discrete(len(DOORS))
        self._room = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        if options and "room" in options:
            self._room = int(options["room"])
        else:
            self._room = int(self.np_random.integers(self.n_rooms))
        return self._room, {}

    def step(self, action):
        if not self.action_space.contains(action):
            raise ValueError(f"action {action!r} is not a door index 0..{len(DOORS) - 1}")
        reward = float(int(action) == int(self.exits[self._room]))
        return self._room, reward, True, False, {"exit": DOORS[int(self.exits[self._room])]}


class RoomsAgent(RLlamaAgent):
    """Scores the four doors; with memory, recalls the door that worked in this room before."""

    action_names = DOORS

    def get_system_prompt(self) -> str:
        return ("You are escaping from rooms. Each room has exactly one exit door, and it is the same door "
                "every time you are in that room. Reply with the colour of the door to open.")

    def format_observation(self, observation) -> str:
        return f"You are in the {ROOMS[int(observation)]}. The doors are red, blue, green and yellow. Which door?"

    def extract_action(self, response: str) -> int:
        for i, door in enumerate(DOORS):
            if door in response.lower():
                return i
        raise ValueError(f"no door colour in {response!r}")

    def format_memories(self, retrieved) -> str:
        # Written episodes are successes only (write_filter), so each memory names an exit.
        return "\n".join(f"Memory: you were in this room before and the {r.experience.action} door was the exit."
                         for r in retrieved)


def make_memory() -> EpisodicMemory:
    """Successful episodes only; recall the best match if it is (nearly) the same room."""
    return EpisodicMemory(k=1, min_similarity=0.95, write_filter=lambda e: e.episode_return > 0)


def success_per_room(agent: RoomsAgent, env: RoomsEnv) -> list[float]:
    """Greedy reward in each room (nothing written to memory, no training)."""
    out = []
    with agent.evaluating(greedy=True):
        for room in range(env.n_rooms):
            obs, _ = env.reset(options={"room": room})
            action = agent.act(obs)
            _, reward, *_ = env.step(action)
            agent.assign_reward(reward)
            agent.terminate_episode()
            out.append(reward)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=192)
    parser.add_argument("--envs", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--model", default=None)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default: 1, measured fastest on 2 cores; 0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    env = RoomsEnv(world_seed=args.seed)
    agent = RoomsAgent(args.model, seed=args.seed, memory=None if args.no_memory else make_memory(),
                       algorithm_config={"policy_head": 0})  # the adapter learns, as benchmarks/memory_ablation.py
    print(f"untrained: {np.mean(success_per_room(agent, env)):.2f} of rooms solved")
    envs = gym.vector.SyncVectorEnv([lambda: RoomsEnv(world_seed=args.seed) for _ in range(args.envs)])
    agent.train(envs, args.episodes, seed=args.seed)
    print(f"trained on {args.episodes} episodes: {np.mean(success_per_room(agent, env)):.2f} of rooms solved")
    if agent.episodic_memory is not None:
        print(f"memory holds {len(agent.episodic_memory)} successful episodes; the last prompt was:\n")
        print(agent.last_prompt)


if __name__ == "__main__":
    main()
