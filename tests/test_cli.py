"""The command line as a newcomer meets it: suggestions for misspellings, no silent abbreviations,
help for every flag, the cost of a run said up front."""

from __future__ import annotations

import pytest

from rllama.cli import build_parser, main
from rllama.experiment import RunConfig


def error_of(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exited:
        main(list(argv))
    assert exited.value.code == 2
    return capsys.readouterr().err


def test_a_misspelled_flag_or_command_gets_a_suggestion(capsys):
    assert "--epsiodes: did you mean --episodes?" in error_of(capsys, "train", "--epsiodes", "3")
    assert "did you mean 'train'?" in error_of(capsys, "trian")
    assert "--sede: did you mean --seed?" in error_of(capsys, "eval", "runs/x", "--sede", "1")


def test_abbreviations_are_not_taken_for_flags(capsys):
    assert "unrecognized arguments: --episode" in error_of(capsys, "train", "--episode", "3")


def test_every_flag_has_help():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            assert action.help, f"rllama {name} {action.option_strings or action.dest} has no help"


def test_evaluation_sizes_are_flags_and_their_cost_is_said_up_front():
    from rllama.cli import _config_from_args

    args = build_parser().parse_args(["train", "--episodes", "32", "--eval-episodes", "50", "--eval-every", "0",
                                      "--segment-episodes", "16"])
    config = _config_from_args(args)
    assert (config.episodes, config.eval_episodes, config.eval_every, config.segment_episodes) == (32, 50, 0, 16)
    assert "2 greedy evaluations of 50 episodes (at the start, at the end: 100 episodes)" in config.plan()
    assert "in 2 segments of 16" in config.plan()
    default = RunConfig().plan()
    assert "640 training episodes" in default and "3 greedy evaluations of 200 episodes" in default
    assert "no evaluation" in RunConfig(eval_episodes=0).plan()


def test_threads_default_to_half_the_cores_and_are_checked(monkeypatch, capsys):
    import os

    from rllama.cli import _config_from_args
    from rllama.experiment.config import ConfigError, auto_threads, resolve_threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert auto_threads() == 1 and resolve_threads("auto") == 1 and "1 torch thread;" in RunConfig().plan()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert resolve_threads("auto") == 8 and resolve_threads(3) == 3
    assert resolve_threads(0) is None and resolve_threads(None) is None
    assert "torch's default threads" in RunConfig(threads=0).plan()
    assert _config_from_args(build_parser().parse_args(["train", "--threads", "2"])).threads == 2
    assert _config_from_args(build_parser().parse_args(["train", "--threads", "0"])).threads == 0
    assert "expected 'auto', a number of threads, or 0" in error_of(capsys, "train", "--threads", "many")
    for bad in (-1, "all", True, 1.5):
        with pytest.raises(ConfigError, match="threads="):
            RunConfig(threads=bad)


def test_an_evaluation_prints_as_one_line_and_keeps_its_returns():
    from rllama.loops import return_stats

    result = return_stats([1.0, -1.0, 0.0, 1.0])
    assert str(result) == repr(result)
    assert repr(result).startswith("mean return +0.2500 ± 0.4787 (s.e.) over 4 episodes")
    assert "\n" not in repr(result) and result["returns"] == [1.0, -1.0, 0.0, 1.0]


def test_progress_bars_label_their_fields(make_agent, capsys):
    from rllama.loops import run_episodes
    from tests.conftest import ChoiceEnv

    agent = make_agent(algorithm_config={"batch_episodes": 2, "minibatch_size": 2, "policy_head": 0})
    run_episodes(agent, ChoiceEnv(), 4, seed=0, progress=True, desc="train")
    err = capsys.readouterr().err
    assert agent.algorithm.num_updates == 2
    assert "ret100=" in err and "ep/s=" in err and "steps/s=" in err and "upd=2" in err and "4/4 ep" in err
    assert "ent=" in err and "invalid" not in err  # the policy's entropy at the last update; it scores
    summary = [line for line in err.splitlines() if line.startswith("train: 4 episodes in ")]
    assert len(summary) == 1 and "mean return" in summary[0] and "4 env steps, 2 updates in all" in summary[0], err
    dqn = make_agent(algorithm="dqn", algorithm_config={"batch_episodes": 2, "learning_starts": 2})
    run_episodes(dqn, ChoiceEnv(), 2, seed=0, progress=True, desc="train")
    assert f"eps={dqn.algorithm.epsilon:.3f}" in capsys.readouterr().err
    result = agent.evaluate(ChoiceEnv(), 3, seed=0, progress=True)
    err = capsys.readouterr().err
    assert "ret=" in err and "ret100" not in err and "upd" not in err and "s/ep" not in err
    assert "eval: 3 episodes in" in err and f"mean return {result['mean_return']:+.3f} over the 3" in err


def test_progress_bars_show_the_share_of_invalid_replies(make_agent, capsys):
    from tests.conftest import ChoiceEnv, FreeTextAgent

    agent = make_agent(FreeTextAgent, max_new_tokens=4, algorithm_config={"batch_episodes": 2, "minibatch_size": 2})
    (stats,) = agent.train(ChoiceEnv(steps=2), 2, seed=0, progress=True)
    share = stats["rollout/parse_failures"] / stats["rollout/steps"]
    assert share > 0  # a random tiny model's 4 bytes rarely say "left" or "right"
    assert stats["rollout/invalid_replies"] == share  # nothing but unparsed replies is invalid by default
    assert f"invalid={share:.0%}" in capsys.readouterr().err
