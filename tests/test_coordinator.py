"""The coordinator's pure parts: straggler flags."""

from psgd.coordinator import stragglers


def test_stragglers_are_workers_far_below_the_others():
    assert stragglers({"a": 40.0, "b": 15.0}) == ["b"]
    assert stragglers({"a": 40.0, "b": 30.0}) == []
    assert stragglers({"a": 40.0, "b": 42.0, "c": 39.0, "d": 10.0}) == ["d"]
    assert stragglers({"a": 40.0}) == [] and stragglers({}) == []
