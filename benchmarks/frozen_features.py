"""What a linear head on the frozen model's features can learn on Blackjack, and why whitening decides it.

    python benchmarks/frozen_features.py --threads 1          # the committed results, about 10 minutes

The embedded SmolLM2-135M reads each of Blackjack's 280 decision states once (``BlackjackAgent``'s
prompt; the agent shows no history, so these are the prompts of every step) followed by each
candidate, "stick" and "hit". On those fixed features, with Gymnasium's Blackjack-v1 (sab) dealing:

- **ridge probes**: least squares on the exact action values (``rllama.agents.blackjack.action_values``),
  the greedy policy read off the fit: what the features hold;
- **Q-learning** as ``DQN`` does it with ``train_adapter=False`` (replay, minibatches of 64, one
  gradient step an episode, Huber loss, a target copied every 10 steps, epsilon 1 -> 0.05 over
  3,000 steps, AdamW at 1e-3), with the head on the raw normalised features and on the same
  features whitened (the top 64 principal components from the first 500 transitions,
  ``ValueHead.fit_whitening``);
- **a linear softmax policy** on whitened features added to the model's own candidate scores,
  trained by a policy gradient with a (whitened) value baseline, minibatches of 4 steps: what an
  on-policy algorithm with a head on frozen features would do (not in the library yet).

Each curve is the exact value of the greedy policy (``policy_value``) every 250 episodes, 3 seeds.
Writes ``results/frozen_features.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REFERENCE_RETURNS, REFERENCE_STYLES, RESULTS, save_figure, versions  # noqa: E402


def features(model):
    """``(action [280, 2, H], prompt [280, H], candidate log-probs [280, 2])`` of the untrained agent."""
    import torch

    from rllama.agents import BlackjackAgent
    from rllama.agents.blackjack import STATES

    agent = BlackjackAgent(model, algorithm="dqn", seed=0, precision="fp32")
    prompts, candidates = agent.state_prompts()
    prior = []
    with torch.no_grad():
        for start in range(0, len(prompts), 32):  # in chunks, as policy_map
            prior += agent.policy.candidate_outputs(prompts[start:start + 32], candidates[start:start + 32]).logprobs
    prompt, action = agent.policy.features(prompts, candidates)
    action = action.reshape(len(STATES), -1, action.shape[-1])
    norm = lambda x: torch.nn.functional.layer_norm(x.double(), (x.shape[-1],)) / math.sqrt(x.shape[-1])  # noqa: E731
    return norm(action), norm(prompt), torch.stack(prior).double()


def whitening(x, k: int):
    """``(mean, basis)`` as ``ValueHead.fit_whitening`` computes them, from rows ``x`` (in their dtype)."""
    from rllama.policy.model import pca_whitening

    return pca_whitening(x, k)


def probes(action, prompt) -> dict:
    import torch

    from rllama.agents.blackjack import STATES, action_values, agreement, policy_value

    y = torch.tensor([action_values(s) for s in STATES], dtype=torch.float64)
    out = {}
    for lam in (1e-4, 1e-3, 1e-2):
        for name, x, target in (("action features, one head", action.reshape(-1, action.shape[-1]), y.reshape(-1, 1)),
                                ("prompt features, a head per action", prompt, y)):
            x1 = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
            w = torch.linalg.solve(x1.T @ x1 + lam * torch.eye(x1.shape[1], dtype=x.dtype), x1.T @ target)
            q = (x1 @ w).reshape(len(STATES), 2)
            policy = {s: int(q[i].argmax()) for i, s in enumerate(STATES)}
            out[f"{name}, ridge {lam:g}"] = {"value": policy_value(policy), "agreement": agreement(policy)}
    return out


def play(policy_step, learn, episodes: int, seed: int, every: int, greedy):
    """Deal ``episodes`` hands of Blackjack-v1 (sab); ``policy_step(i)`` acts in state index ``i``,
    ``learn(trajectory)`` sees each finished hand; the greedy map's exact value every ``every``."""
    import gymnasium as gym

    from rllama.agents.blackjack import STATES, agreement, policy_value

    index = {s: i for i, s in enumerate(STATES)}
    env = gym.make("Blackjack-v1", sab=True)
    curve = []
    for episode in range(1, episodes + 1):
        obs, _ = env.reset(seed=seed * 1_000_003 + episode)
        done, trajectory = False, []
        while not done:
            i = index[(int(obs[0]), int(obs[1]), bool(obs[2]))]
            a = policy_step(i)
            obs, r, term, trunc, _ = env.step(a)
            done = term or trunc
            following = None if done else index[(int(obs[0]), int(obs[1]), bool(obs[2]))]
            trajectory.append((i, a, float(r), following))
        learn(trajectory)
        if episode % every == 0:
            policy = {s: greedy(index[s]) for s in STATES}
            curve.append({"episodes": episode, "map_value": policy_value(policy), "agreement": agreement(policy)})
    return curve


def q_learning(action, whiten: int, seed: int, args) -> list:
    import torch

    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    x = action
    k = whiten or x.shape[-1]
    w = torch.zeros(k, dtype=x.dtype, requires_grad=True)
    b = torch.zeros((), dtype=x.dtype, requires_grad=True)
    opt = torch.optim.AdamW([w, b], lr=1e-3, weight_decay=0.0)
    state = {"basis": None if whiten else (torch.zeros(x.shape[-1], dtype=x.dtype), torch.eye(k, dtype=x.dtype)),
             "target": (w.detach().clone(), b.detach().clone()), "steps": 0, "grad_steps": 0}
    replay = []

    def q(i, params=None):
        if state["basis"] is None:
            return torch.zeros(x[i].shape[:-1], dtype=x.dtype)
        mean, basis = state["basis"]
        ww, bb = (w, b) if params is None else params
        return ((x[i] - mean) @ basis) @ ww + bb

    def act(i):
        eps = max(0.05, 1 - 0.95 * state["steps"] / 3000)
        state["steps"] += 1
        if rng.random() < eps:
            return rng.randrange(2)
        with torch.no_grad():
            return int(q(i).argmax())

    def learn(trajectory):
        replay.extend(trajectory)
        if len(replay) < 500:
            return
        if state["basis"] is None:
            state["basis"] = whitening(x[torch.tensor([t[0] for t in replay])].reshape(-1, x.shape[-1]), whiten)
            state["target"] = (w.detach().clone(), b.detach().clone())
        batch = [replay[j] for j in torch.randint(len(replay), (64,), generator=gen).tolist()]
        y = torch.tensor([t[2] for t in batch], dtype=x.dtype)
        with torch.no_grad():
            for j, t in enumerate(batch):
                if t[3] is not None:
                    y[j] += 0.99 * q(t[3], state["target"])[int(q(t[3]).argmax())]
        idx = torch.tensor([t[0] for t in batch])
        loss = torch.nn.functional.huber_loss(q(idx)[torch.arange(64), torch.tensor([t[1] for t in batch])], y)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([w, b], 1.0)
        opt.step()
        state["grad_steps"] += 1
        if state["grad_steps"] % 10 == 0:
            state["target"] = (w.detach().clone(), b.detach().clone())

    def greedy(i):
        with torch.no_grad():
            return int(q(i).argmax())

    return play(act, learn, args.episodes, seed, args.every, greedy)


def policy_gradient(action, prompt, prior, seed: int, args) -> list:
    import torch

    rng = random.Random(seed)
    k = 64
    w = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    vw = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    vb = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([w, vw, vb], lr=args.pg_lr)
    state = {"basis": None, "vbasis": None, "seen": [], "batch": [], "episodes": 0}

    def logits(i):
        if state["basis"] is None:
            return prior[i]
        mean, basis = state["basis"]
        return prior[i] + ((action[i] - mean) @ basis) @ w

    def value(i):
        mean, basis = state["vbasis"]
        return ((prompt[i] - mean) @ basis) @ vw + vb

    def act(i):
        state["seen"].append(i)
        with torch.no_grad():
            p_stick = float(torch.softmax(logits(i), -1)[0])
        return 0 if rng.random() < p_stick else 1

    def learn(trajectory):
        ret = sum(t[2] for t in trajectory)
        state["batch"] += [(i, a, ret) for i, a, _, _ in trajectory]
        state["episodes"] += 1
        if state["episodes"] % 16:
            return
        batch, state["batch"] = state["batch"], []
        if state["basis"] is None:
            if len(state["seen"]) < 500:
                return
            seen = torch.tensor(state["seen"])
            state["basis"] = whitening(action[seen].reshape(-1, action.shape[-1]), k)
            state["vbasis"] = whitening(prompt[seen], k)
        for start in range(0, len(batch), 4):
            part = batch[start:start + 4]
            idx = torch.tensor([t[0] for t in part])
            logp = torch.log_softmax(torch.stack([logits(int(i)) for i in idx]), -1)
            ret = torch.tensor([t[2] for t in part], dtype=torch.float64)
            v = value(idx)
            chosen = logp[torch.arange(len(part)), torch.tensor([t[1] for t in part])]
            entropy = -(logp.exp() * logp).sum(-1).mean()
            loss = -(chosen * (ret - v).detach()).mean() - 0.01 * entropy + 0.5 * ((v - ret) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()

    def greedy(i):
        with torch.no_grad():
            return int(logits(i).argmax())

    return play(act, learn, args.episodes, seed, args.every, greedy)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(9, 5))
    colors = {"Q-learning, raw features": "tab:gray", "Q-learning, whitened (64)": "tab:pink",
              "policy gradient, whitened (64)": "tab:blue"}
    for name, runs in result["runs"].items():
        x = [p["episodes"] for p in runs[0]]
        y = np.array([[p["map_value"] for p in r] for r in runs])
        for row in y:
            ax.plot(x, row, color=colors[name], lw=0.7, alpha=0.5)
        ax.plot(x, y.mean(0), color=colors[name], lw=2.2, label=f"{name} (mean of {len(runs)})")
    for name, value in REFERENCE_RETURNS.items():
        ax.axhline(value, ls="--", lw=1, color=REFERENCE_STYLES[name], label=f"{name} ({value:+.3f})")
    ax.set_ylim(-0.45, 0.0)
    ax.set_xlabel("episodes")
    ax.set_ylabel("exact value of the greedy policy")
    ax.set_title("Linear heads on frozen SmolLM2-135M features, Blackjack-v1 (sab)")
    ax.legend(fontsize=8, loc="lower right")
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--episodes", type=int, default=4000)
    parser.add_argument("--every", type=int, default=250, help="episodes between two greedy maps")
    parser.add_argument("--pg-lr", type=float, default=3e-2, help="Adam learning rate of the policy-gradient heads")
    parser.add_argument("--model", default=None)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--name", default="frozen_features")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    action, prompt, prior = features(args.model)
    result = {"benchmark": "frozen_features", "command": "python " + " ".join(sys.argv), "config": vars(args),
              "versions": versions(), "reference_returns": REFERENCE_RETURNS, "probes": probes(action, prompt)}
    runs = {"Q-learning, raw features": [], "Q-learning, whitened (64)": [], "policy gradient, whitened (64)": []}
    for seed in args.seeds:
        runs["Q-learning, raw features"].append(q_learning(action, 0, seed, args))
        runs["Q-learning, whitened (64)"].append(q_learning(action, 64, seed, args))
        runs["policy gradient, whitened (64)"].append(policy_gradient(action, prompt, prior, seed, args))
        for name, rs in runs.items():
            print(f"seed {seed} {name}: " + " ".join(f"{p['map_value']:+.3f}" for p in rs[-1][3::4]), flush=True)
    result["runs"] = runs
    result["final"] = {name: [r[-1]["map_value"] for r in rs] for name, rs in runs.items()}
    result["wall_s"] = time.perf_counter() - t0
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    plot(result, RESULTS / f"{args.name}.png")
    for name, value in result["probes"].items():
        print(f"probe {name}: {value['value']:+.3f} ({value['agreement']:.0%})")
    for name, finals in result["final"].items():
        print(f"{name}: " + ", ".join(f"{v:+.3f}" for v in finals))


if __name__ == "__main__":
    main()
