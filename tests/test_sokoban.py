"""Sokoban (rllama/Sokoban-v0): level generation, the BFS solver, rewards, the Gymnasium API and the agent."""

from __future__ import annotations

import warnings

import gymnasium as gym
import pytest
from gymnasium.utils.env_checker import check_env

from rllama.agents.sokoban import SokobanAgent
from rllama.envs.sokoban import (
    ACTIONS,
    CHARSET,
    Level,
    SokobanEnv,
    generate_level,
    shortest_solution,
    solve,
)
from rllama.errors import InvalidActionError

CORRIDOR = """
# # # # # #
# P X _ O #
# # # # # #
"""


def play(env: SokobanEnv, actions) -> tuple[list[float], bool, bool, dict]:
    """Step ``actions``; the rewards, the last ``terminated``, ``truncated`` and ``info``."""
    rewards, terminated, truncated, info = [], False, False, {}
    for action in actions:
        _, reward, terminated, truncated, info = env.step(action)
        rewards.append(reward)
    return rewards, terminated, truncated, info


def test_generation_is_deterministic_per_seed():
    generate_level.cache_clear()
    first = [generate_level(seed) for seed in range(20)]
    generate_level.cache_clear()
    assert [generate_level(seed) for seed in range(20)] == first
    assert len(set(first)) > 15  # seeds give different levels
    env = SokobanEnv()
    a, info_a = env.reset(seed=7)
    b, info_b = SokobanEnv().reset(seed=7)
    assert a == b and info_a == info_b and info_a["level"] is not None


@pytest.mark.parametrize("max_steps", [10, 6])
def test_every_level_is_solvable_and_its_bfs_solution_wins(max_steps):
    env = SokobanEnv(max_steps=max_steps)
    for seed in range(60):
        obs, info = env.reset(seed=seed)
        path = shortest_solution(env.level)
        assert 1 <= info["solution_length"] == len(path) == solve(env.level) <= max_steps
        assert env.observation_space.contains(obs) and obs == env.level.render()
        rewards, terminated, truncated, info = play(env, path)
        assert terminated and not truncated and info["success"] and info["steps"] == len(path)


def test_rendering_uses_ragens_symbols_and_parses_back():
    level = Level.parse(CORRIDOR)
    assert level.render() == CORRIDOR.strip()
    assert Level.parse("######\n#PX_O#\n######") == level  # spaces between cells are optional
    assert level.render(box=(1, 4), player=(1, 3)) == "# # # # # #\n# _ _ P √ #\n# # # # # #"
    assert level.render(box=(1, 3), player=(1, 4)) == "# # # # # #\n# _ _ X S #\n# # # # # #"
    assert set(level.render()) <= set(CHARSET)
    with pytest.raises(ValueError, match="border"):
        Level.parse("#####\n#PXO_\n#####")
    with pytest.raises(ValueError, match="one target, box and player"):
        Level.parse("#####\n#PX_#\n#####")


def test_reward_sequence_and_bumping_into_walls():
    level = Level.parse("""
    # # # # # #
    # # # # # #
    # P X _ O #
    # # # # # #
    # # # # # #
    # # # # # #
    """)
    env = SokobanEnv(render_mode="ansi")
    obs, info = env.reset(options={"level": level})
    assert info["solution_length"] == 2 and info["level"] is None and not info["success"]
    _, reward, terminated, truncated, info = env.step(ACTIONS.index("up"))  # into a wall
    assert reward == pytest.approx(-0.1) and not (terminated or truncated or info["moved"])
    rewards, terminated, truncated, info = play(env, [3, 3])
    assert rewards == pytest.approx([-0.1, 10.9]) and terminated and not truncated and info["success"]
    assert env.render().splitlines()[2] == "# _ _ P √ #"
    with pytest.raises(RuntimeError, match="after the episode ended"):
        env.step(0)


def test_truncation_at_max_steps():
    env = SokobanEnv(max_steps=10)
    env.reset(seed=3)
    wall = next(a for a in range(4) if (env.level.player[0] + (-1, 1, 0, 0)[a],
                                        env.level.player[1] + (0, 0, -1, 1)[a]) not in env.level.floor)
    for step in range(1, 11):
        _, reward, terminated, truncated, info = env.step(wall)
        assert reward == pytest.approx(-0.1) and not terminated and truncated == (step == 10)
    assert not info["success"] and info["steps"] == 10


def test_invalid_action_names_the_valid_ones():
    env = SokobanEnv()
    env.reset(seed=0)
    for bad in (4, -1, "up", 1.5):
        with pytest.raises(InvalidActionError, match=r"0 \(up\), 1 \(down\), 2 \(left\), 3 \(right\)"):
            env.step(bad)
    with pytest.raises(RuntimeError, match="before reset"):
        SokobanEnv().step(0)


@pytest.mark.filterwarnings("ignore:.*not having a spec")  # the registered env's test checks with a spec
def test_check_env_passes():
    check_env(SokobanEnv())
    check_env(SokobanEnv(levels=range(5), render_mode="ansi"))


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="num_boxes=2"):
        SokobanEnv(num_boxes=2)
    for kwargs in ({"dim": (4, 6)}, {"max_steps": 0}, {"levels": []}, {"render_mode": "human"}):
        with pytest.raises(ValueError):
            SokobanEnv(**kwargs)
    with pytest.raises(RuntimeError, match="no level solvable"):
        generate_level(0, (4, 4))  # a 2×2 room: the box can never be pulled off its target
    with pytest.raises(ValueError, match="solvable and not yet solved"):
        SokobanEnv().reset(options={"level": Level.parse("######\n#P√__#\n#____#\n#____#\n#____#\n######")})


def test_levels_restrict_the_seeds_and_splits_are_disjoint():
    train, held_out = SokobanEnv(levels=range(0, 50)), SokobanEnv(levels=range(10_000, 10_020))
    train_seeds = {train.reset(seed=k)[1]["level"] for k in range(200)}
    held_seeds = {held_out.reset(seed=k)[1]["level"] for k in range(100)}
    assert train_seeds <= set(range(50)) and len(train_seeds) > 40
    assert held_seeds <= set(range(10_000, 10_020)) and not train_seeds & held_seeds
    obs, info = train.reset(options={"level": 10_005})  # any seed on request
    assert info["level"] == 10_005 and obs == generate_level(10_005).render()


def test_registered_env_makes_a_sokoban_env():
    import rllama  # noqa: F401  (registers rllama/Sokoban-v0)

    env = gym.make("rllama/Sokoban-v0", levels=[1, 2])
    obs, info = env.reset(seed=0)
    assert isinstance(env.unwrapped, SokobanEnv) and info["level"] in (1, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # with a spec, check_env also makes the env in each render mode
        check_env(env.unwrapped)


def test_agent_hooks_on_a_rendered_observation(make_agent):
    agent = make_agent(cls=SokobanAgent)
    obs = generate_level(0).render()
    assert agent.keep_history is False and agent.scores_actions()
    assert agent.hooks.observation_text(obs) == obs + "\nYour move?"
    assert [m.split(":")[0] for m in agent.hooks.valid_actions(obs)] == ["up", "down", "left", "right"]
    assert make_agent(cls=SokobanAgent, describe=False).hooks.valid_actions(obs) == ["up", "down", "left", "right"]
    assert [agent.extract_action(m) for m in agent.hooks.valid_actions(obs)] == [0, 1, 2, 3]
    prompt = agent.hooks.system_prompt()
    assert all(symbol in prompt for symbol in "PXO#_S√")
    for reply, action in [("up", 0), (" Down\n", 1), ("LEFT.", 2), ("I go right", 3), ("<answer>Up</answer>", 0)]:
        assert agent.extract_action(reply) == action
    with pytest.raises(ValueError, match="no move"):
        agent.extract_action("jump")


def test_each_described_move_says_what_it_does():
    from rllama.agents.sokoban import describe_moves

    level = Level.parse("""
        # # # # # #
        # _ _ _ _ #
        # _ X P _ #
        # _ _ # _ #
        # O _ _ _ #
        # # # # # #""")
    assert describe_moves(level.render()) == ["up: walk farther from the box", "down: blocked by a wall",
                                              "left: push the box closer to the target",
                                              "right: walk farther from the box"]
    assert describe_moves(level.render(box=(2, 1), player=(2, 2)))[2] == "left: the box cannot move"
    assert describe_moves(level.render(box=(3, 1), player=(2, 1)))[1] == "down: push the box onto the target"
    assert describe_moves(level.render(box=(1, 2), player=(1, 3)))[2] == "left: push the box into a corner"
    assert describe_moves(level.render(box=(2, 2), player=(2, 4)))[2] == "left: walk closer to the box"
    assert describe_moves("# # #\n# P #\n# # #") == ["up", "down", "left", "right"]  # not a board: bare names


def test_tiny_agent_plays_an_episode(make_agent):
    from rllama.loops import run_episodes

    agent = make_agent(cls=SokobanAgent)
    env = SokobanEnv()
    returns = run_episodes(agent, env, 1, seed=0)
    # Either never solved (10 steps at -0.1) or solved at step k: 10.9 - 0.1 (k - 1).
    possible = [-1.0] + [10.9 - 0.1 * (k - 1) for k in range(1, 11)]
    assert len(returns) == 1 and min(abs(returns[0] - r) for r in possible) < 1e-6
