import math

import pytest

from refusal_lens.stats import Rate, wilson_interval


def test_wilson_known_values():
    # textbook example: 81 of 263 -> [0.2553, 0.3662] (Wilson 1927 / Newcombe 1998 table)
    lo, hi = wilson_interval(81, 263)
    assert lo == pytest.approx(0.2553, abs=5e-4) and hi == pytest.approx(0.3662, abs=5e-4)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=5e-4)
    lo, hi = wilson_interval(10, 10)
    assert hi == 1.0 and lo == pytest.approx(0.7225, abs=5e-4)


def test_wilson_edges():
    assert all(math.isnan(x) for x in wilson_interval(0, 0))
    with pytest.raises(ValueError):
        wilson_interval(5, 4)


def test_rate_roundtrip_and_text():
    r = Rate.of([True, False, False, True])
    assert (r.k, r.n, r.rate) == (2, 4, 0.5)
    d = r.to_dict()
    assert d["ci95"][0] < 0.5 < d["ci95"][1] and Rate.from_dict(d) == r
    assert str(r).startswith("0.500 [") and "(n=4)" in str(r)
