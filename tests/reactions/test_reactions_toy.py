"""The power-law regression toy: freezing the large term's exponent frees the small one."""

from __future__ import annotations

import numpy as np

from mmtk.reactions.toy import fit_power_law_toy


def test_toy_reaches_true_exponents():
    result = fit_power_law_toy(epochs=90_000, seed=2)
    # Plain Adam stalls near p = (3.84, 1.974) until p_2 is frozen to 2.
    assert 3.5 < result.history[1][1] < 4.0
    assert result.frozen_epochs[1] == 40_000
    np.testing.assert_allclose(result.exponents, [1.0, 2.0], atol=1e-9)
    assert result.losses[-1] < 1e-20


def test_toy_stalls_without_freezing():
    result = fit_power_law_toy(epochs=45_000, seed=2, tolerance=0.0)
    assert result.frozen_epochs == [None, None]
    assert abs(result.exponents[0] - 1.0) > 2.0
    assert result.losses[-1] > 1e-5
