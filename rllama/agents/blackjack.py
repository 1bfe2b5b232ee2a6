"""A ready-made agent for Gymnasium's Blackjack-v1 (scoring "stick" / "hit"), and its policy map.

The policy map is the figure RL people read first (Sutton & Barto, Figure 5.2): the greedy action
in every decision state, player total x dealer card, with and without a usable ace, beside the
optimal policy. :func:`optimal_policy` solves the game exactly (infinite deck, the dealer stands
on 17 including soft 17, as Gymnasium's Blackjack-v1); :meth:`BlackjackAgent.policy_map` reads the
agent's greedy action at the first step of an episode in each state.
"""

from __future__ import annotations

import re
from functools import cache

from rllama.agent import RLlamaAgent

STICK, HIT = 0, 1
DEALER_CARDS = tuple(range(1, 11))  # 1 is the ace
HARD_TOTALS = tuple(range(4, 22))  # no usable ace
SOFT_TOTALS = tuple(range(12, 22))  # a usable ace: 12 (A+A) to 21
STATES = tuple([(t, d, False) for t in HARD_TOTALS for d in DEALER_CARDS]
               + [(t, d, True) for t in SOFT_TOTALS for d in DEALER_CARDS])
"""Every decision state ``(player total, dealer card, usable ace)``: 180 hard and 100 soft."""

_CARD_P = {c: (4 / 13 if c == 10 else 1 / 13) for c in range(1, 11)}


class BlackjackAgent(RLlamaAgent):
    """Plays Gymnasium's Blackjack-v1: observation ``(player_sum, dealer_card, usable_ace)``.

    The observation is the whole state, so prompts show no earlier turns (``keep_history = False``):
    a state reads the same whenever it is met, and :meth:`policy_map` is the policy at every step.
    """

    keep_history = False

    def get_system_prompt(self) -> str:
        return (
            "You are playing Blackjack. Get a hand total closer to 21 than the dealer without going over 21. "
            "Each turn, reply with one word: hit (take another card) or stick (stop taking cards)."
        )

    def format_observation(self, observation) -> str:
        player_sum, dealer_card, usable_ace = (int(x) for x in observation)
        dealer = "an ace" if dealer_card == 1 else str(dealer_card)
        ace = " (with a usable ace)" if usable_ace else ""
        return f"Your hand totals {player_sum}{ace}. The dealer shows {dealer}. Hit or stick?"

    def get_valid_actions(self, observation) -> list[str]:
        return ["stick", "hit"]

    def extract_action(self, response: str) -> int:
        words = re.findall(r"[a-z]+", response.lower())
        if "hit" in words:
            return 1
        if "stick" in words or "stand" in words or "stay" in words:
            return 0
        raise ValueError(f"no 'hit' or 'stick' in {response!r}")

    def state_prompts(self) -> tuple[list[list[int]], list[list[list[int]]]]:
        """The prompt ids of every state in :data:`STATES` at an episode's first step, and its
        candidates' ids (as the agent renders them when acting)."""
        prompts = [self.chat.prompt_ids([{"role": "system", "content": self.get_system_prompt()},
                                         {"role": "user", "content": self.format_observation(state)}])
                   for state in STATES]
        candidates = [[self.chat.reply_ids(c) for c in self.get_valid_actions(state)] for state in STATES]
        return prompts, candidates

    def policy_map(self) -> dict[tuple[int, int, bool], int]:
        """The greedy action (0 stick, 1 hit) in every state of :data:`STATES`, at an episode's first step.

        Chosen as evaluation chooses: the algorithm's greedy rule (argmax of the candidate scores,
        or of the Q-values for DQN), in batches of 32 states without gradients.
        """
        import torch

        prompts, candidates = self.state_prompts()
        choices = []
        for start in range(0, len(STATES), 32):  # in chunks: one batch of 280 prompts peaks at gigabytes
            with torch.no_grad():
                outputs = self.policy.candidate_outputs(prompts[start:start + 32], candidates[start:start + 32],
                                                        q_heads=self.algorithm.acting_heads)
            choices += self.algorithm.choose_actions(outputs, greedy=True, generator=torch.Generator(), training=False)
        return {state: int(k) for state, (k, _) in zip(STATES, choices)}


@cache
def _dealer_outcomes(hard: int, ace: bool) -> dict[int, float]:
    """Distribution of the dealer's final total (22 = bust) from a hand of ``hard`` points (aces as 1)."""
    total = hard + 10 if ace and hard + 10 <= 21 else hard
    if total > 21:
        return {22: 1.0}
    if total >= 17:
        return {total: 1.0}
    out: dict[int, float] = {}
    for card, p in _CARD_P.items():
        for final, q in _dealer_outcomes(hard + card, ace or card == 1).items():
            out[final] = out.get(final, 0.0) + p * q
    return out


def _stick_value(total: int, dealer: int) -> float:
    value = 0.0
    for final, p in _dealer_outcomes(dealer, dealer == 1).items():
        value += p * (1.0 if final == 22 or total > final else (0.0 if total == final else -1.0))
    return value


@cache
def _action_values(hard: int, ace: bool, dealer: int) -> tuple[float, float]:
    """``(value of sticking, value of hitting)`` then playing optimally, for a player hand of ``hard``
    points (aces as 1; ``ace``: the hand holds one) against the dealer's card."""
    total = hard + 10 if ace and hard + 10 <= 21 else hard
    hit = 0.0
    for card, p in _CARD_P.items():
        new_hard, new_ace = hard + card, ace or card == 1
        if new_hard > 21:
            hit -= p
        else:
            hit += p * max(_action_values(new_hard, new_ace, dealer))
    return _stick_value(total, dealer), hit


def action_values(state: tuple[int, int, bool]) -> tuple[float, float]:
    """Exact ``(Q(stick), Q(hit))`` of a decision state under optimal play afterwards."""
    total, dealer, usable = state
    return _action_values(total - 10 if usable else total, bool(usable), int(dealer))


def optimal_policy() -> dict[tuple[int, int, bool], int]:
    """The optimal action in every state of :data:`STATES` (hit when it is worth more than sticking)."""
    return {s: HIT if action_values(s)[1] > action_values(s)[0] else STICK for s in STATES}


def policy_value(policy: dict) -> float:
    """Exact expected return on a fresh deal of Blackjack-v1 with ``sab=True`` (a natural that sticks
    wins unless the dealer has one too) of a policy that acts by ``policy`` in every state of the
    episode: ``policy[state]`` is the action (0 stick, 1 hit) or the probability of hitting. Cheap:
    no episodes are played."""

    @cache
    def value(hard: int, ace: bool, dealer: int) -> float:
        total = hard + 10 if ace and hard + 10 <= 21 else hard
        p_hit = float(policy[(total, dealer, total != hard)])
        hit = 0.0
        if p_hit > 0:
            for card, p in _CARD_P.items():
                hit += -p if hard + card > 21 else p * value(hard + card, ace or card == 1, dealer)
        return (1 - p_hit) * _stick_value(total, dealer) + p_hit * hit

    expected = 0.0
    for dealer, pd in _CARD_P.items():
        for first, p1 in _CARD_P.items():
            for second, p2 in _CARD_P.items():
                hard, ace = first + second, 1 in (first, second)
                p = pd * p1 * p2
                if ace and hard == 11:  # a natural
                    p_hit = float(policy[(21, dealer, True)])
                    dealer_natural = _CARD_P[10] if dealer == 1 else (_CARD_P[1] if dealer == 10 else 0.0)
                    hit = sum(q * value(11 + card, True, dealer) for card, q in _CARD_P.items())
                    expected += p * ((1 - p_hit) * (1.0 - dealer_natural) + p_hit * hit)
                else:
                    expected += p * value(hard, ace, dealer)
    return expected


def agreement(policy: dict, reference: dict | None = None) -> float:
    """Share of :data:`STATES` in which ``policy`` takes the ``reference`` (default optimal) action."""
    reference = optimal_policy() if reference is None else reference
    return sum(policy[s] == reference[s] for s in STATES) / len(STATES)


def format_policy_map(policy: dict, reference: dict | None = None) -> str:
    """The policy as two text grids (no usable ace, usable ace): ``H`` hit, ``S`` stick, lower case
    where it differs from ``reference`` (default: the optimal policy)."""
    reference = optimal_policy() if reference is None else reference
    lines = []
    for usable, totals in ((False, HARD_TOTALS), (True, SOFT_TOTALS)):
        lines.append(("usable ace" if usable else "no usable ace") + "   dealer: A 2 3 4 5 6 7 8 9 10")
        for total in reversed(totals):
            cells = []
            for d in DEALER_CARDS:
                s = (total, d, usable)
                mark = "H" if policy[s] == HIT else "S"
                cells.append(mark if policy[s] == reference[s] else mark.lower())
            lines.append(f"  total {total:2d}            " + " ".join(cells[:-1]) + "  " + cells[-1])
    lines.append(f"agreement with the optimal policy: {agreement(policy, reference):.0%} of {len(STATES)} states "
                 "(lower case: differs)")
    return "\n".join(lines)
