"""An averaging variant whose averaging can never happen is a config error naming the key (not a baseline run
under another name), for the variant being trained only; papa.variants' schedule is the averagers' own."""

import pytest

from papa.averagers import averager_for
from papa.config import check_averaging_fires
from papa.errors import PapaError
from papa.variants import averaging_epochs, first_push, push_epoch_steps
from tests.helpers import tiny_experiment


def exp(epochs=6, window=(0.0, 1.0), **averaging):
    return tiny_experiment(train={"epochs": epochs}, averaging={"window": list(window), **averaging})


@pytest.mark.parametrize("variant", ["papa-all", "papa-2"])
@pytest.mark.parametrize(("epochs", "every", "window", "key"), [
    (6, 6, (0.0, 1.0), "every"),  # at the end of epoch 6 = the last: never
    (5, 7, (0.0, 1.0), "every"),
    (10, 5, (0.0, 0.4), "window"),  # epochs 1-4: no multiple of 5
    (10, 2, (0.81, 1.0), "window"),  # epochs 9-10: 10 is the last
])
def test_replace_that_never_fires_names_the_key(variant, epochs, every, window, key):
    e = exp(epochs, window, **{variant: {"every": every}})
    named = "window" if key == "window" else f"{variant}.every"
    with pytest.raises(PapaError, match=rf"experiment 'tiny': averaging\.{named}: "):
        check_averaging_fires(e, variant)
    check_averaging_fires(e, "baseline")  # the experiment's other variants are not concerned
    check_averaging_fires(e, "papa", steps_per_epoch=100)


def test_replace_that_fires_passes():
    # averaging after the first epoch (from_start) fires even when `every` reaches past the last epoch
    check_averaging_fires(exp(6, (0.0, 1.0), **{"papa-all": {"every": 6, "from_start": True}}), "papa-all")
    check_averaging_fires(exp(6, (0.0, 1.0), **{"papa-all": {"every": 5}}), "papa-all")
    check_averaging_fires(exp(10, (0.5, 1.0), **{"papa-2": {"every": 3}}), "papa-2")  # epochs 6 and 9


def test_an_empty_window_is_refused_when_the_experiment_loads():
    with pytest.raises(PapaError, match=r"averaging\.window: start 0.5 must be before end 0.5$"):
        exp(window=(0.5, 0.5))
    assert exp(window=(0.5, 0.51))["averaging"]["window"] == [0.5, 0.51]


def test_push_that_never_fires_names_the_key():
    e = exp(2, (0.0, 1.0), papa={"every": 50})
    check_averaging_fires(e, "papa")  # steps per epoch unknown (the workflow's DAG check): not judged
    check_averaging_fires(e, "papa", steps_per_epoch=25)  # step 50 = the last: fires
    with pytest.raises(PapaError, match=r"averaging\.papa\.every: 50 steps: PAPA would never push in "
                       r"averaging\.window \[0\.0, 1\.0\] \(steps 1-48 of 48\)$"):
        check_averaging_fires(e, "papa", steps_per_epoch=24)
    with pytest.raises(PapaError, match=r"averaging\.papa\.every"):
        check_averaging_fires(exp(4, (0.5, 0.7), papa={"every": 25}), "papa", steps_per_epoch=25)  # 51-70


@pytest.mark.parametrize("variant", ["papa-all", "papa-2"])
@pytest.mark.parametrize("epochs", [1, 2, 5, 7, 12])
@pytest.mark.parametrize("every", [1, 2, 3, 5])
@pytest.mark.parametrize("window", [(0.0, 1.0), (0.25, 0.75), (0.5, 1.0), (0.0, 0.3)])
@pytest.mark.parametrize("from_start", [False, True])
def test_config_schedule_is_the_averagers(variant, epochs, every, window, from_start):
    e = exp(epochs, window, **{variant: {"every": every, "from_start": from_start}})
    averager = averager_for(variant, e)
    assert averaging_epochs(e, variant) == [k for k in range(1, epochs + 1) if averager.due_after_epoch(k, epochs)]


@pytest.mark.parametrize("every", [1, 3, 10, 40])
@pytest.mark.parametrize("window", [(0.0, 1.0), (0.25, 0.75), (0.5, 1.0), (0.9, 1.0), (0.33, 0.34)])
@pytest.mark.parametrize("push_steps", ["paper", "authors"])
def test_config_first_push_is_the_averagers(every, window, push_steps):
    e = exp(3, window, papa={"every": every})
    e["fidelity"]["push_steps"] = push_steps
    averager, spe = averager_for("papa", e), 11
    total = 3 * spe
    due = [s for s in range(1, total + 1) if averager.due_after_step(s, total, push_epoch_steps(e, spe))]
    assert first_push(e, "papa", spe) == (due[0] if due else None)
