"""PopulAtion Parameter Averaging (PAPA): populations trained with PAPA, PAPA-all and PAPA-2,
averaged into one model with model soups and REPAIR."""

__version__ = "0.1.0"

from papa.alignment import align, align_members_, align_population  # noqa: E402
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
from papa.similarity import cosine_similarity, population_similarity  # noqa: E402
from papa.soups import (  # noqa: E402
    aligned_average_soup,
    aligned_greedy_soup,
    average_soup,
    ensemble_logits,
    greedy_alignment,
    greedy_soup,
    make_soups,
    sequential_alignment,
)

__all__ = [
    "SCHEMES",
    "Population",
    "align",
    "align_members_",
    "align_population",
    "aligned_average_soup",
    "aligned_greedy_soup",
    "average_all_",
    "average_soup",
    "cosine_similarity",
    "draw_pairs",
    "ensemble_logits",
    "greedy_alignment",
    "greedy_soup",
    "make_soups",
    "member_moments",
    "mix_",
    "mixing_matrix",
    "pair_average_",
    "population_similarity",
    "push_toward_average_",
    "repair",
    "reset_batchnorm",
    "sequential_alignment",
    "weighted_average_",
]
