"""Multi-scale variable-batch sampler: size table, DDP sharding, per-epoch shuffling, exact resumption."""

from __future__ import annotations

from collections import Counter

import pytest

from mobilevit.data.sampler import MultiScaleBatchSampler, multiscale_sizes

SIZES = [(32, 5), (64, 3), (96, 2)]


def epoch(sampler: MultiScaleBatchSampler, number: int, start_step: int = 0) -> list[list[tuple[int, int, int]]]:
    sampler.set_epoch(number, start_step)
    return list(sampler)


def test_multiscale_sizes_of_the_recipe():
    assert multiscale_sizes() == [(160, 327), (192, 227), (256, 128), (288, 101), (320, 81)]
    # base size not on the grid is added; sizes are made divisible
    assert multiscale_sizes(64, 256, 32, 96, 3, 16) == [(32, 1024), (64, 256), (96, 113)]
    assert multiscale_sizes(100, 8, 50, 150, 2, 32) == [(64, 19), (100, 8), (160, 3)]
    assert multiscale_sizes(64, 1, 128, 128, 1) == [(64, 1), (128, 1)]
    with pytest.raises(ValueError):
        multiscale_sizes(min_size=320, max_size=160)


def test_single_scale_in_order():
    sampler = MultiScaleBatchSampler(10, base_size=64, base_batch=4, shuffle=False)
    batches = list(sampler)
    assert len(sampler) == 3
    assert [[i for i, _, _ in b] for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert {size for b in batches for _, size, _ in b} == {64}
    seeds = [s for b in batches for _, _, s in b]
    assert len(set(seeds)) == 10 and all(0 <= s < 2**63 for s in seeds)
    assert [len(b) for b in MultiScaleBatchSampler(10, sizes=[(64, 4)], shuffle=False, drop_last=True)] == [4, 4]


@pytest.mark.parametrize("n, world_size", [(103, 4), (60, 3), (5, 8)])
def test_ranks_share_sizes_and_cover_the_dataset(n: int, world_size: int):
    samplers = [
        MultiScaleBatchSampler(n, sizes=SIZES, seed=3, rank=r, world_size=world_size) for r in range(world_size)
    ]
    runs = [epoch(s, 2) for s in samplers]
    assert len({len(s) for s in samplers}) == 1 and all(
        len(s) == len(run) for s, run in zip(samplers, runs, strict=True)
    )
    table = dict(SIZES)
    for r, run in enumerate(runs):
        assert [[size for _, size, _ in b] for b in run] == [[size for _, size, _ in b] for b in runs[0]]
        assert [len(b) for b in run] == [len(b) for b in runs[0]]
        assert all(len(b) == table[b[0][1]] for b in run[:-1]) and 0 < len(run[-1]) <= table[run[-1][0][1]]
        assert sum(len(b) for b in run) == -(-n // world_size), f"rank {r} shard size"
    everything = Counter(i for run in runs for b in run for i, _, _ in b)
    assert set(everything) == set(range(n))
    assert sum(everything.values()) - n == -(-n // world_size) * world_size - n  # only the wrap-around padding repeats


def test_each_scale_is_used_with_its_batch():
    batches = list(MultiScaleBatchSampler(3000, sizes=SIZES, seed=1))
    assert Counter((b[0][1], len(b)) for b in batches[:-1]).keys() == set(SIZES)
    assert all(len({size for _, size, _ in b}) == 1 for b in batches)


def test_epochs_shuffle_differently_and_reproducibly():
    sampler = MultiScaleBatchSampler(50, sizes=SIZES, seed=7)
    first, second = epoch(sampler, 0), epoch(sampler, 1)
    assert first != second
    assert sorted(i for b in first for i, _, _ in b) == list(range(50))
    assert epoch(MultiScaleBatchSampler(50, sizes=SIZES, seed=7), 1) == second
    assert epoch(MultiScaleBatchSampler(50, sizes=SIZES, seed=8), 1) != second
    unshuffled = epoch(MultiScaleBatchSampler(50, sizes=SIZES, shuffle=False), 1)
    assert [i for b in unshuffled for i, _, _ in b] == list(range(50))


def test_aug_seed_depends_on_seed_epoch_and_index_only():
    def seeds(sampler: MultiScaleBatchSampler, number: int) -> dict[int, int]:
        return {i: s for b in epoch(sampler, number) for i, _, s in b}

    single = seeds(MultiScaleBatchSampler(40, sizes=SIZES, seed=5), 3)
    sharded = {}
    for rank in range(2):
        sharded |= seeds(MultiScaleBatchSampler(40, sizes=SIZES, seed=5, rank=rank, world_size=2, shuffle=False), 3)
    assert sharded == single
    assert seeds(MultiScaleBatchSampler(40, sizes=SIZES, seed=5), 4) != single
    assert len(set(single.values())) == 40


def test_resume_skips_the_first_batches_exactly():
    sampler = MultiScaleBatchSampler(100, sizes=SIZES, seed=2, rank=1, world_size=2)
    full = epoch(sampler, 4)
    steps = len(full)
    for k in (0, 1, steps - 1, steps, steps + 2):
        assert epoch(sampler, 4, start_step=k) == full[k:]
        assert len(sampler) == steps
    with pytest.raises(ValueError):
        sampler.set_epoch(4, start_step=-1)


def test_drop_last_keeps_only_full_batches():
    batches = list(MultiScaleBatchSampler(101, sizes=SIZES, seed=4, drop_last=True))
    assert batches and all(len(b) == dict(SIZES)[b[0][1]] for b in batches)
    assert sum(map(len, batches)) > 101 - max(b for _, b in SIZES)


def test_empty_and_invalid():
    assert list(MultiScaleBatchSampler(0)) == [] and len(MultiScaleBatchSampler(0)) == 0
    for kwargs in ({"rank": 2, "world_size": 2}, {"sizes": []}, {"sizes": [(64, 0)]}):
        with pytest.raises(ValueError):
            MultiScaleBatchSampler(10, **kwargs)


def test_repeated_augmentation_repeats_each_image_with_its_own_seeds():
    n, r = 60, 3
    plain_run = epoch(MultiScaleBatchSampler(n, sizes=SIZES, seed=6), 2)
    plain = {i: s for b in plain_run for i, _, s in b}
    sampler = MultiScaleBatchSampler(n, sizes=SIZES, seed=6, repeats=r)
    keys = [k for b in epoch(sampler, 2) for k in b]
    assert [(b[0][1], len(b)) for b in epoch(sampler, 2)] == [(b[0][1], len(b)) for b in plain_run]  # same steps
    assert len(keys) == n
    indices = [i for i, _, _ in keys]
    assert [indices[k : k + r] for k in range(0, n, r)] == [[indices[k]] * r for k in range(0, n, r)]
    assert len(set(indices)) == n // r  # a third of the dataset, each image three times
    assert len({s for _, _, s in keys}) == n  # every copy is augmented differently
    first = {}
    for i, _, s in keys:
        first.setdefault(i, s)
    assert all(plain[i] == s for i, s in first.items())  # copy 0 keeps the seed it has without repeats
    assert epoch(sampler, 3) != epoch(sampler, 2)
    assert epoch(MultiScaleBatchSampler(n, sizes=SIZES, seed=6, repeats=r), 2) == epoch(sampler, 2)
    with pytest.raises(ValueError, match="repeats"):
        MultiScaleBatchSampler(n, repeats=0)


def test_repeated_augmentation_spreads_copies_over_ranks_and_resumes():
    n, r = 50, 2
    ranks = [MultiScaleBatchSampler(n, sizes=SIZES, seed=1, rank=k, world_size=r, repeats=r) for k in range(r)]
    runs = [epoch(s, 5) for s in ranks]
    for b0, b1 in zip(*runs, strict=True):  # the same images at the same step, each rank its own copy
        assert [(i, size) for i, size, _ in b0] == [(i, size) for i, size, _ in b1]
        assert all(s0 != s1 for (_, _, s0), (_, _, s1) in zip(b0, b1, strict=True))
    assert sum(len(b) for b in runs[0]) == n // r
    full = runs[1]
    assert epoch(ranks[1], 5, start_step=3) == full[3:]
