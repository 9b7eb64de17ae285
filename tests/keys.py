"""The keys of a run's random generators (papa.rng: ``generator(*key)``, ``derive_seed(*key)``) and the wrong keys a
one-line slip would give. A test that pins a draw recomputes it from its key spelled out and checks that the key
reproduces the draw while none of ``wrong_keys(key)`` does: dropping or changing any component of the key (the
seed, the purpose, the member, the epoch or step) then fails the test."""

import itertools

PURPOSES = ("validation-split", "init", "policies", "order", "augment", "global", "average", "mutate", "member",
            "swa-batchnorm", "repair-batchnorm", "validation", "soups-validation", "evaluate-validation",
            "alignment", "soups-alignment", "similarity-alignment", "repair-images")
"""Every purpose the library names in a key (tests/unit/test_random_keys.py checks the library names no other)."""


def wrong_keys(key: tuple) -> list[tuple]:
    """``key`` with one component dropped, a number moved by one, a purpose replaced by any other, or two
    numbers swapped."""
    wrong = []
    for i, k in enumerate(key):
        wrong.append(key[:i] + key[i + 1:])
        others = [p for p in PURPOSES if p != k] if isinstance(k, str) else [k + 1, k - 1]
        wrong += [key[:i] + (other,) + key[i + 1:] for other in others]
    numbers = [i for i, k in enumerate(key) if not isinstance(k, str)]
    for i, k in itertools.combinations(numbers, 2):
        if key[i] != key[k]:
            swapped = list(key)
            swapped[i], swapped[k] = key[k], key[i]
            wrong.append(tuple(swapped))
    return wrong


def pinned(draw, key: tuple, actual, equal=None) -> None:
    """``draw(key)`` equals ``actual`` (``equal``, default ``same``), and ``draw(k)`` differs for every wrong key k."""
    equal = equal or same
    assert equal(draw(key), actual), f"the draw is not the one of key {key}"
    for wrong in wrong_keys(key):
        assert not equal(draw(wrong), actual), f"key {wrong} gives the same draw as {key}: the test cannot tell them"


def same(a, b) -> bool:
    """Exact equality of nested tuples/lists of tensors and plain values."""
    import torch

    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and torch.equal(a, b)
    return a == b
