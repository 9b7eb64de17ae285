"""PopulAtion Parameter Averaging (PAPA): populations trained with PAPA, PAPA-all and PAPA-2, averaged into one
model with model soups and REPAIR. The names below are imported on first use (``papa.Population`` imports torch
then), so that the commands that only read and render results start without loading torch."""

import sys
from importlib import import_module
from types import ModuleType

__version__ = "0.1.0"

_EXPORTS = {
    "papa.alignment": ["align", "align_members_", "align_population"],
    "papa.averaging": ["SCHEMES", "average_all_", "draw_pairs", "mix_", "mixing_matrix", "pair_average_",
                       "push_toward_average_", "weighted_average_"],
    "papa.export": ["load_model", "load_soup"],
    "papa.population": ["Population"],
    "papa.repair": ["member_moments", "repair", "reset_batchnorm"],
    "papa.similarity": ["cosine_similarity", "population_similarity"],
    "papa.soups": ["aligned_average_soup", "aligned_greedy_soup", "average_soup", "ensemble_logits",
                   "greedy_alignment", "greedy_soup", "make_soups", "sequential_alignment"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'papa' has no attribute {name!r}")
    value = globals()[name] = getattr(import_module(_MODULE_OF[name]), name)  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _Package(ModuleType):
    """Importing a submodule named like an export (``papa.repair``) would bind the module to that name on the
    package; the export keeps it, as with an eager import."""

    def __setattr__(self, name: str, value) -> None:
        if name not in _MODULE_OF or not isinstance(value, ModuleType):
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
