"""Learning curves from a run folder's ``metrics.jsonl``."""

from __future__ import annotations

import json
import os
from pathlib import Path

from rllama.errors import require


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The records of ``<run_dir>/metrics.jsonl`` (lines that are not JSON objects, e.g. cut by a crash, skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; is {run_dir} an rllama run folder with the jsonl logger?")
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):  # anything else is not a record rllama wrote
            records.append(record)
    return records


def plot_run(run_dir: str | os.PathLike, output: str | os.PathLike | None = None) -> Path:
    """Plot training return (per segment) and greedy evaluation return against training episodes.

    Writes ``<run_dir>/learning_curve.png`` (or ``output``) and returns its path.
    """
    return plot_runs([run_dir], output or Path(run_dir) / "learning_curve.png")


def plot_runs(run_dirs: list[str | os.PathLike], output: str | os.PathLike) -> Path:
    """Learning curves of several runs in one PNG (one colour a run)."""
    matplotlib = require("matplotlib", "plot", "plotting")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_eval, ax_train) = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run_dir in enumerate(run_dirs):
        records = read_metrics(run_dir)
        name = Path(run_dir).name
        colour = colours[i % len(colours)]
        evals = [r for r in records if r.get("kind") == "eval" and _numbers(r, "episodes", "eval/mean_return")]
        segments = [r for r in records if r.get("kind") == "segment" and _numbers(r, "episodes", "train/mean_return")]
        if evals:
            ax_eval.errorbar([r["episodes"] for r in evals], [r["eval/mean_return"] for r in evals],
                             yerr=[r["eval/stderr"] if _numbers(r, "eval/stderr") else 0.0 for r in evals],
                             marker="o", capsize=3, color=colour, label=name)
        if segments:
            ax_train.plot([r["episodes"] for r in segments], [r["train/mean_return"] for r in segments],
                          marker=".", color=colour, label=name)
    ax_eval.set_title("greedy evaluation (± s.e.)")
    ax_train.set_title("training episodes (mean return per segment)")
    for ax in (ax_eval, ax_train):
        ax.set_xlabel("training episodes")
        ax.set_ylabel("mean return")
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
    fig.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output


def _numbers(record: dict, *keys: str) -> bool:
    return all(isinstance(record.get(k), (int, float)) and not isinstance(record.get(k), bool) for k in keys)
