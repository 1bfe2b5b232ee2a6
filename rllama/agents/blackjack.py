"""A ready-made agent for Gymnasium's Blackjack-v1 (scoring "stick" / "hit")."""

from __future__ import annotations

import re

from rllama.agent import RLlamaAgent


class BlackjackAgent(RLlamaAgent):
    """Plays Gymnasium's Blackjack-v1: observation ``(player_sum, dealer_card, usable_ace)``."""

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
