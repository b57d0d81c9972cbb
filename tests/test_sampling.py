"""The default tier's sampling of cross products (``tests/conftest.py``, the ``sample`` marker)."""

import types

from conftest import _covering_sample


def _items(**axes):
    """Fake collected items: the cross product of ``axes``, first axis outermost."""
    combos = [{}]
    for name, values in axes.items():
        combos = [{**c, name: v} for c in combos for v in values]
    return [types.SimpleNamespace(callspec=types.SimpleNamespace(params=c)) for c in combos]


def test_every_value_of_every_axis_is_kept_in_the_fewest_cases():
    items = _items(shape=("37", "784", "1", "32003"), dname=("f32", "bf16"))
    pairings = set()
    for start in range(len(items)):
        kept = [items[i].callspec.params for i in _covering_sample(items, ("shape", "dname"), start)]
        assert len(kept) == 4
        assert {p["shape"] for p in kept} == {"37", "784", "1", "32003"}
        assert {p["dname"] for p in kept} == {"f32", "bf16"}
        pairings.add(frozenset((p["shape"], p["dname"]) for p in kept))
    # Sibling groups (another start) pair the values differently: together they run every pair.
    assert set().union(*pairings) == {(s, d) for s in ("37", "784", "1", "32003") for d in ("f32", "bf16")}


def test_a_single_axis_keeps_each_value_once():
    items = _items(v=(10, 1000, 32003))
    assert sorted(_covering_sample(items, ("v",), 0)) == [0, 1, 2]
