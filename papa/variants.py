"""The variants and when anything scheduled in a run happens: the one source training, config checks, tables, figures,
CLI and schemas read (no torch: the Snakefile reads it too). A variant is a schedule, its ``unit`` (``none``; ``steps``:
a push toward the mean every ``every`` steps, papa.averagers.Push; ``epochs``: members replaced by mixtures every
``every`` epochs, papa.averagers.Replace), and a scheme (the push's ``alpha`` or ``averaging.<name>.scheme``). A new
variant: a VARIANTS entry and an ``averaging`` block in the experiment schema (docs/architecture.md)."""

from dataclasses import dataclass

from papa import fidelity
from papa.errors import PapaError

UNITS = ("none", "steps", "epochs")


@dataclass(frozen=True)
class Variant:
    name: str  # run directories (<results>/<experiment>/<name>/), `variants:` in configs, `averaging.<name>`
    label: str  # tables, figures and messages
    color: str  # its curves and markers in the figures (a matplotlib colour)
    unit: str  # what its averaging period counts (UNITS)


VARIANTS = {v.name: v for v in (  # in the order the tables and figures show them
    Variant("baseline", "Baseline", "C0", "none"),
    Variant("papa", "PAPA", "C1", "steps"),
    Variant("papa-all", "PAPA-all", "C2", "epochs"),
    Variant("papa-2", "PAPA-2", "C3", "epochs"),
)}


def check(name: str) -> Variant:
    """The variant called ``name``; a PapaError naming the known ones otherwise."""
    if name not in VARIANTS:
        raise PapaError(f"unknown variant {name!r}; expected one of {', '.join(VARIANTS)}")
    return VARIANTS[name]


def by_unit(unit: str) -> list[str]:
    return [v.name for v in VARIANTS.values() if v.unit == unit]


def in_window(window, done: int, total: int) -> bool:
    """Whether ``done`` of ``total`` (steps or epochs) lies inside ``averaging.window`` (fractions of training)."""
    return window[0] * total < done <= window[1] * total


def _scripts_due(epoch: int, epochs: int, every: int, from_start: bool, window) -> bool:
    """main.py:217's test, e = epoch - 1: ``e % k == 0 and (e > 0 or mix_from_start) and lo*E <= e+1 <= hi*E``."""
    return (epoch - 1) % every == 0 and (epoch > 1 or from_start) and window[0] * epochs <= epoch <= window[1] * epochs


def averages_after(epoch: int, epochs: int, every: int, from_start: bool, window, zero_based: bool = False) -> bool:
    """Whether an ``epochs`` variant averages after epoch ``epoch`` (1-based) of ``epochs``: every ``every``-th and,
    with ``from_start`` (the authors' mix_from_start), the first, inside the window; ``zero_based`` (fidelity
    averaging_epochs): the scripts' test, after epochs k+1, 2k+1, ...; never after the last (main.py:271, 299)."""
    if zero_based:
        return _scripts_due(epoch, epochs, every, from_start, window) and epoch < epochs
    due = epoch % every == 0 or (from_start and epoch == 1)
    return due and epoch < epochs and in_window(window, epoch, epochs)


def scripts_last_epoch(epoch: int, epochs: int, every: int, from_start: bool, window) -> bool:
    """Whether the scripts' test fires after the last epoch ``epoch`` of ``epochs`` ((E - 1) % k == 0 inside the
    window), where they mix nothing but still pair, mutate and select (papa.averagers.Replace.last_epoch)."""
    return _scripts_due(epoch, epochs, every, from_start, window) and epoch == epochs


def pushes_after(step: int, total: int, every: int, window, epoch_steps: int | None = None) -> bool:
    """Whether a ``steps`` variant pushes after optimizer step ``step`` (1-based) of ``total``; with ``epoch_steps``
    (fidelity push_steps), the scripts' count: the step's 0-based index within its epoch of ``epoch_steps``."""
    counted = step if epoch_steps is None else (step - 1) % epoch_steps
    return counted % every == 0 and in_window(window, step, total)


def push_epoch_steps(exp: dict, steps_per_epoch: int) -> int | None:
    """``pushes_after``'s ``epoch_steps`` for ``exp``: the epoch's steps when it counts the pushes as the scripts do."""
    return steps_per_epoch if fidelity.authors(exp, "push_steps") else None


def zero_based(exp: dict) -> bool:
    """Whether ``exp`` counts its averaging epochs as the authors' scripts do (fidelity option averaging_epochs)."""
    return fidelity.authors(exp, "averaging_epochs")


def averaging_epochs(exp: dict, variant: str, window=None) -> list[int]:
    """The epochs (1-based) after which ``variant`` (``epochs`` unit) averages in ``exp`` (``window``: an override)."""
    epochs, a = exp["train"]["epochs"], exp["averaging"][variant]
    window = exp["averaging"]["window"] if window is None else window
    return [e for e in range(1, epochs)
            if averages_after(e, epochs, a["every"], a["from_start"], window, zero_based(exp))]


def first_push(exp: dict, variant: str, steps_per_epoch: int) -> int | None:
    """The first optimizer step after which ``variant`` (a ``steps`` variant) pushes, None if it never does."""
    total, every = exp["train"]["epochs"] * steps_per_epoch, exp["averaging"][variant]["every"]
    epoch_steps = push_epoch_steps(exp, steps_per_epoch)
    return next((s for s in range(1, total + 1)
                 if pushes_after(s, total, every, exp["averaging"]["window"], epoch_steps)), None)


def swa_start_epoch(exp: dict) -> int | None:
    """The first SWA epoch (0-based; epochs before it run the regular schedule), or None without SWA."""
    if (swa := exp["train"]["swa"]) is None:
        return None
    return round(swa["start"] * exp["train"]["epochs"]) if swa["start"] < 1 else int(swa["start"])
