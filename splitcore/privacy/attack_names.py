"""The leakage audit's attacks by name: what each is called in words, and which channel it reads.

Kept apart from the audit itself so that pages and the measured table can name attacks without
loading the models' code.
"""

from __future__ import annotations

LEARNED_INVERSION = "learned_inversion"
NETWORK_INVERSION = "network_inversion"
ALIGNED_INVERSION = "aligned_inversion"
EXACT_SEARCH = "exact_search"
GRADIENT_LABELS = "gradient_labels"
GRADIENT_SEARCH = "gradient_search"
ATTACK_TITLES = {
    LEARNED_INVERSION: "linear map fit on public text (hidden states)",
    NETWORK_INVERSION: "network fit on public text (hidden states)",
    ALIGNED_INVERSION: "map aligned to the received states without their tokens (hidden states)",
    EXACT_SEARCH: "candidate search through the public Bottom (hidden states)",
    GRADIENT_LABELS: "labels read from the gradients (gradients)",
    GRADIENT_SEARCH: "labels searched through the public Top (gradients)",
}
HIDDEN_STATES = "hidden states"
GRADIENTS = "gradients"
# The channel each attack reads: the hidden states the trunk receives, or the gradients sent back to it.
ATTACK_CHANNELS = {
    LEARNED_INVERSION: HIDDEN_STATES, NETWORK_INVERSION: HIDDEN_STATES, ALIGNED_INVERSION: HIDDEN_STATES,
    EXACT_SEARCH: HIDDEN_STATES, GRADIENT_LABELS: GRADIENTS, GRADIENT_SEARCH: GRADIENTS,
}
# Attacks that run only when the audit is asked for its strong attacks (they cost minutes, not seconds).
STRONG_ATTACKS = (NETWORK_INVERSION,)


def channel_rate(rates: dict[str, float], channel: str) -> float:
    """The highest of ``rates`` (attack name -> share of tokens read) among the attacks on ``channel``."""
    return max((rate for name, rate in rates.items() if ATTACK_CHANNELS.get(name) == channel), default=0.0)
