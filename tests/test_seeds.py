"""The test seeds: a swept test draws what the plain test draws under its own base seed, so the
replay command a failure prints reproduces it."""

import pytest

from .conftest import replay, seed_for, unswept


@pytest.mark.parametrize(
    ("swept", "plain"),
    [
        ("tests/t.py::f[base+3]", "tests/t.py::f"),
        ("tests/t.py::f[base+0-reference-cpu-float32-sum]", "tests/t.py::f[reference-cpu-float32-sum]"),
        ("tests/t.py::f[cpu-base+12]", "tests/t.py::f[cpu]"),
        ("tests/t.py::f[cpu-float32]", "tests/t.py::f[cpu-float32]"),
    ],
)
def test_a_swept_id_replays_as_the_plain_test(swept, plain):
    assert unswept(swept) == plain
    base, nodeid = replay(swept, 5)
    assert nodeid == plain and seed_for(nodeid, base) == seed_for(plain, base)


def test_base_seeds_give_different_draws():
    seeds = {seed_for("tests/t.py::f", base) for base in range(1000)}
    assert len(seeds) == 1000 and all(0 <= s < 2**63 for s in seeds)
