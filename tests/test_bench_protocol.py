"""gpunet.bench.protocol: how rounds are paired into ratios."""

from gpunet.bench import protocol


def test_ratios_within_rounds_pair_the_samples_of_each_round():
    within = protocol._ratios_within_rounds([2.0, 6.0, 3.0, 9.0], [1.0, 2.0, 3.0])
    assert within["per_round"] == [2.0, 3.0, 1.0]  # the fourth round lost its pair
    assert (within["median"], within["min"], within["max"]) == (2.0, 1.0, 3.0)
