"""What each example costs a newcomer: wall time and peak memory of `make demo`'s script, the quick start
and every other example, run as a user runs them (a fresh process each, one torch thread).

    python benchmarks/examples_cost.py                      # every example, one after another (~30 min)
    python benchmarks/examples_cost.py --only quickstart zoggian

Peak memory is the largest sum of resident memory over the example's process and all its children
(Ray workers included), sampled every 0.2 s. Writes ``results/examples_cost.json`` and ``.png``; a
part already measured is kept unless named with ``--only`` (results are merged by name).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, save_figure, versions  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = {  # name: (command, what it does)
    "demo": (["examples/blackjack.py", "--save", ""], "make demo: DQN, 3,000 Blackjack episodes, 2 x 1,000 eval"),
    "quickstart": (["examples/quickstart.py"], "README quick start: PPO, 1,000 single-env episodes, 500 eval"),
    "custom_algorithm": (["examples/custom_algorithm.py"], "a registered algorithm, 64 episodes, adapter trained"),
    "memory_rooms": (["examples/memory_rooms.py"], "episodic memory, 192 episodes"),
    "textworld": (["examples/textworld.py"], "TextWorld games, 96 episodes (scoring)"),
    "zoggian": (["examples/zoggian.py"], "a skill taught from examples, 12 epochs"),
    "async_blackjack": (["examples/async_blackjack.py"], "async PPO, 2 Ray workers, 480 episodes"),
}


def measure(argv: list[str]) -> dict:
    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    watched = psutil.Process(proc.pid)
    peak = 0
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    reader.start()
    while proc.poll() is None:
        total = 0
        try:
            for p in [watched, *watched.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
        except psutil.Error:
            pass
        peak = max(peak, total)
        time.sleep(0.2)
    reader.join(timeout=5)
    wall = time.perf_counter() - start
    return {"wall_s": wall, "peak_rss_gib": peak / 2**30, "returncode": proc.returncode,
            "last_lines": [line.rstrip() for line in output[-6:]]}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, (t, m) = plt.subplots(1, 2, figsize=(11, 4))
    t.barh(names, [results[n]["wall_s"] / 60 for n in names], color="tab:blue")
    t.set_xlabel("wall time (min)")
    m.barh(names, [results[n]["peak_rss_gib"] for n in names], color="tab:orange")
    m.set_xlabel("peak memory, process tree (GiB)")
    fig.suptitle("examples as a user runs them (one torch thread each)")
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(EXAMPLES), help="measure these (default: all)")
    parser.add_argument("--name", default="examples_cost")
    args = parser.parse_args()
    path = RESULTS / f"{args.name}.json"
    record = json.loads(path.read_text()) if path.exists() else {"examples": {}}
    for name in args.only or list(EXAMPLES):
        argv, what = EXAMPLES[name]
        print(f"{name}: python {' '.join(argv)}", flush=True)
        result = {"command": "python " + " ".join(argv), "what": what, **measure(argv)}
        print(f"  {result['wall_s'] / 60:.1f} min, peak {result['peak_rss_gib']:.2f} GiB, exit "
              f"{result['returncode']}", flush=True)
        if result["returncode"] != 0:
            print("\n".join(result["last_lines"]), flush=True)
        record["examples"][name] = result
        record.update(versions=versions(), command="python " + " ".join(sys.argv))
        RESULTS.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1))
    plot(record["examples"], RESULTS / f"{args.name}.png")


if __name__ == "__main__":
    main()
