"""FrozenLake on random maps as text (rllama/FrozenLake-v0), its agent, the exact upper bound, and
registration of every env rllama ships on ``import rllama``."""

from __future__ import annotations

import subprocess
import sys

import gymnasium as gym
import pytest
from gymnasium.utils.env_checker import check_env

from rllama import InvalidActionError
from rllama.agents import FrozenLakeAgent
from rllama.envs.frozenlake import ACTIONS, FrozenLakeText, make_map, optimal_success
from rllama.loops import run_episodes


def test_importing_rllama_registers_every_env_it_ships_in_a_fresh_interpreter():
    code = ("import gymnasium as gym, rllama\n"
            "for env_id in ('rllama/TextWorld-v0', 'rllama/FrozenLake-v0', 'rllama/Sokoban-v0'):\n"
            "    gym.spec(env_id)\n"
            "env = gym.make('rllama/FrozenLake-v0', maps=[3])\n"
            "print(env.reset(seed=0)[1]['map'])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "3"


def test_the_env_passes_gymnasiums_checks_and_renders_the_grid():
    env = FrozenLakeText(maps=[7], render_mode="ansi")
    check_env(env, skip_render_check=True)
    text, info = env.reset(seed=1)
    rows = text.split("\n")
    assert len(rows) == 4 and all(len(r) == 4 for r in rows) and rows[0][0] == "P" and rows[-1][-1] == "G"
    assert env.render() == text and info == {"map": 7, "success": False}
    assert env.desc == make_map(7)


def test_maps_come_from_their_seeds_and_splits_stay_apart():
    assert make_map(5) == make_map(5) and make_map(5) != make_map(6)
    train = FrozenLakeText(maps=range(0, 50))
    held_out = FrozenLakeText(maps=range(10_000, 10_050))
    seen_train = {train.reset(seed=s)[1]["map"] for s in range(200)}
    seen_held = {held_out.reset(seed=s)[1]["map"] for s in range(200)}
    assert seen_train <= set(range(50)) and seen_held <= set(range(10_000, 10_050)) and len(seen_train) > 30
    assert FrozenLakeText().reset(seed=3) == FrozenLakeText().reset(seed=3)  # a fresh map per seed


def test_an_episode_ends_on_the_goal_or_a_hole_or_the_step_limit():
    env = FrozenLakeText(size=2, maps=[0], is_slippery=False, max_steps=3)
    env.reset(seed=0)
    env.desc = ("SF", "FG")  # a known map, rebuilt below
    from gymnasium.envs.toy_text.frozen_lake import FrozenLakeEnv

    env._lake = FrozenLakeEnv(desc=list(env.desc), is_slippery=False)
    env._position, _ = env._lake.reset(seed=0)
    _, reward, terminated, truncated, info = env.step(2)  # right
    assert (reward, terminated, truncated, info["success"]) == (0.0, False, False, False)
    text, reward, terminated, truncated, info = env.step(1)  # down: the goal
    assert (reward, terminated, truncated, info["success"]) == (1.0, True, False, True) and text == "__\n_√"
    env.reset(seed=0)
    for _ in range(2):
        assert not env.step(3)[3]  # up, against the wall
    assert env.step(3)[3]  # the third action truncates


def test_the_upper_bound_is_exact():
    assert optimal_success(("SF", "FG"), False, 1) == 0.0
    assert optimal_success(("SF", "FG"), False, 2) == 1.0
    assert optimal_success(("SF", "FG"), True, 2) == pytest.approx(2 / 9)  # 1/3 to a neighbour, 1/3 on to G
    assert optimal_success(("SH", "FG"), True, 20) < optimal_success(("SF", "FG"), True, 20) < 1.0
    for seed in range(20):  # every generated map has a path: without slipping, always solvable in 20 moves
        assert optimal_success(make_map(seed), False, 20) == 1.0
        assert 0.0 < optimal_success(make_map(seed), True, 20) <= optimal_success(make_map(seed), True, 40)


def test_bad_input_gets_clear_errors():
    env = FrozenLakeText(maps=[1])
    env.reset(seed=0)
    with pytest.raises(InvalidActionError, match="0 \\(left\\), 1 \\(down\\), 2 \\(right\\), 3 \\(up\\)"):
        env.step(4)
    for bad in ({"size": 1}, {"size": 13}, {"size": 4.5}, {"p": 0}, {"max_steps": 0}, {"maps": []}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            FrozenLakeText(**bad)
    with pytest.raises(RuntimeError, match="before reset"):
        FrozenLakeText().step(0)


def test_the_agent_reads_the_grid_and_plays_an_episode(make_agent):
    agent = make_agent(cls=FrozenLakeAgent)
    assert [m.split(":")[0] for m in agent.get_valid_actions("P___\n___G")] == list(ACTIONS) and not agent.keep_history
    assert make_agent(cls=FrozenLakeAgent, describe=False).get_valid_actions("P___\n___G") == list(ACTIONS)
    assert [agent.extract_action(a) for a in ACTIONS] == [0, 1, 2, 3] and agent.extract_action(" Up.") == 3
    assert [agent.extract_action(m) for m in agent.get_valid_actions("P___\n___G")] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="no move"):
        agent.extract_action("jump")
    returns = run_episodes(agent, gym.make("rllama/FrozenLake-v0", maps=[2], max_steps=5), 2, seed=0)
    assert len(returns) == 2 and all(r in (0.0, 1.0) for r in returns)
    assert "P" in agent.last_prompt and "Your move?" in agent.last_prompt


def test_each_described_move_says_where_it_aims_and_may_slide():
    from rllama.agents.frozenlake import describe_moves

    assert describe_moves("P___\nO___\n____\n___G") == [
        "left: the edge; may slide onto the edge or a hole",
        "down: a hole; may slide onto the edge or ice",
        "right: ice, closer to the goal; may slide onto a hole or the edge",
        "up: the edge; may slide onto ice or the edge",
    ]
    assert describe_moves("____\n__PG\n____\n_O__")[2] == "right: the goal; may slide onto ice or ice"
    assert describe_moves("____\n_P__\n____\n___G")[0] == "left: ice, farther from the goal; may slide onto ice or ice"
    assert describe_moves("____\n____\n____\n____") == list(ACTIONS)  # no player or goal drawn: bare names
