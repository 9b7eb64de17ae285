"""PopulAtion Parameter Averaging (PAPA): populations trained with PAPA, PAPA-all and PAPA-2,
averaged into one model with model soups and REPAIR."""

__version__ = "0.1.0"

from papa.averaging import (  # noqa: E402
    SCHEMES,
    average_all_,
    draw_pairs,
    mix_,
    mixing_matrix,
    pair_average_,
    push_toward_average_,
    weighted_average_,
)
from papa.population import Population  # noqa: E402
from papa.repair import member_moments, repair, reset_batchnorm  # noqa: E402
from papa.soups import average_soup, ensemble_logits, greedy_soup  # noqa: E402

__all__ = [
    "SCHEMES",
    "Population",
    "average_all_",
    "average_soup",
    "draw_pairs",
    "ensemble_logits",
    "greedy_soup",
    "member_moments",
    "mix_",
    "mixing_matrix",
    "pair_average_",
    "push_toward_average_",
    "repair",
    "reset_batchnorm",
    "weighted_average_",
]
