"""Loss terms the algorithms share: the clipped surrogate, the KL divergence to the reference policy,
explained variance."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rllama.algorithms.buffers import Step, unit_logprobs_of
from rllama.policy.model import StepEvaluation


@dataclass
class Minibatch:
    """What an on-policy loss sees: steps, their re-evaluation, and the targets."""

    steps: list[Step]
    evaluation: StepEvaluation  # under the current parameters, with gradients
    new_logprobs: torch.Tensor  # [U] per unit (a scored step or declared choice is one, a free reply one per token)
    old_logprobs: torch.Tensor  # [U] recorded when acting
    owner: torch.Tensor  # [U] step index of each unit
    unit_weights: torch.Tensor  # [U] 1 / units of the step: every step weighs the same
    advantages: torch.Tensor  # [S]
    returns: torch.Tensor  # [S]
    importance_weights: torch.Tensor | None = None  # [U] pi_prox / pi_behav of stale steps (capped), else None
    reference: list[torch.Tensor] | None = None  # per step, its distribution under the reference policy

    def unit_advantages(self) -> torch.Tensor:
        """Each unit's advantage; for steps acted by an older policy, times its importance weight."""
        adv = self.advantages[self.owner]
        return adv if self.importance_weights is None else adv * self.importance_weights

    def mean_over_steps(self, per_unit: torch.Tensor) -> torch.Tensor:
        """Average of a per-unit quantity in which every step weighs the same."""
        return (per_unit * self.unit_weights).sum() / len(self.steps)


def clipped_surrogate(mb: Minibatch, clip_range: float) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped surrogate loss ``-E[min(r A, clip(r, 1-eps, 1+eps) A)]`` over the minibatch's units."""
    ratio = (mb.new_logprobs - mb.old_logprobs).exp()
    adv = mb.unit_advantages()
    surrogate = torch.min(ratio * adv, ratio.clamp(1 - clip_range, 1 + clip_range) * adv)
    clipfrac = ((ratio - 1).abs() > clip_range).float().mean().item()
    return -mb.mean_over_steps(surrogate), {"policy/clipfrac": clipfrac}


def old_unit_logprobs(steps: Sequence[Step]) -> torch.Tensor:
    """Log-probabilities recorded when acting, one per unit (see ``StepEvaluation.unit_logprobs``)."""
    return torch.tensor([x for s in steps for x in unit_logprobs_of(s)], dtype=torch.float32)


def kl_to_reference(new: StepEvaluation, reference: Sequence[torch.Tensor], steps: Sequence[Step],
                    direction: str = "reverse") -> torch.Tensor:
    """KL divergence between the policy and the reference per step, ``[S]``.

    ``direction="reverse"`` is ``KL(pi || pi_ref)``, ``"forward"`` is ``KL(pi_ref || pi)``. Scored
    steps get the exact divergence over their candidates, replies to declared choices over their
    choices. Free generated steps get the mean over reply
    tokens (sampled from ``pi``) of a non-negative estimator with ``d = log p_ref - log p``:
    ``exp(d) - d - 1`` (reverse, Schulman's k3) or ``d exp(d) - exp(d) + 1`` (forward, the same
    f-divergence estimator for ``r log r``), since the full-vocabulary sums are not taken.
    """
    if direction not in ("forward", "reverse"):
        raise ValueError(f"direction={direction!r}; expected 'forward' or 'reverse'")
    out = []
    for dist, ref, step in zip(new.distributions, reference, steps):
        ref = ref.to(dist.device)
        if step.unit_index is not None:
            p, q = (dist, ref) if direction == "reverse" else (ref, dist)
            out.append((p.exp() * (p - q)).sum())
        else:
            d = ref - dist
            e = torch.exp(d)
            out.append((e - d - 1).mean() if direction == "reverse" else (d * e - e + 1).mean())
    return torch.stack(out)


def explained_variance(pred: torch.Tensor, target: torch.Tensor) -> float:
    """1 - Var(target - pred) / Var(target); nan when the target is constant."""
    var = target.var(unbiased=False)
    if var.item() == 0:
        return float("nan")
    return float(1 - (target - pred).var(unbiased=False) / var)

