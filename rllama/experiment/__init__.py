"""Running experiments: configs, the training runner with exact-resume checkpoints, loggers, plots.

    from rllama.experiment import RunConfig, train, resume

    summary = train(RunConfig(algorithm="ppo", episodes=640))
    summary = resume("runs/blackjack-ppo-seed0")      # after a crash: continues exactly

The ``rllama`` command line (``rllama train / eval / sweep / plot``) is a thin layer over these.
"""

from rllama.experiment.config import ConfigError, RunConfig, parse_overrides, resolve_agent_class
from rllama.experiment.loggers import Callback, ConsoleLogger, JSONLLogger, WandbLogger, make_loggers
from rllama.experiment.plotting import plot_run, plot_runs, read_metrics
from rllama.experiment.runner import Experiment, make_agent, make_env, resume, train
from rllama.experiment.sweep import load_sweep, run_sweep

__all__ = [
    "Callback",
    "ConfigError",
    "ConsoleLogger",
    "Experiment",
    "JSONLLogger",
    "load_sweep",
    "RunConfig",
    "WandbLogger",
    "make_agent",
    "make_env",
    "make_loggers",
    "parse_overrides",
    "plot_run",
    "plot_runs",
    "read_metrics",
    "resolve_agent_class",
    "resume",
    "run_sweep",
    "train",
]
