from collections import Counter

import numpy as np
import pytest

from ser_cache.system.sampling import OX_MODES, EpochSampler, is_ox, select_training, undersample

# 7 N, 4 H, 3 S, 2 X: undersampling keeps 2 of each class present (8 rows).
CLASSES = np.array(list("NNNNNNNHHHHSSSXX"))


def test_undersample_takes_min_count_from_every_class_without_duplicates():
    idx = undersample(CLASSES, np.random.default_rng(0))
    assert len(set(idx.tolist())) == len(idx)
    assert Counter(CLASSES[idx].tolist()) == {"N": 2, "H": 2, "S": 2, "X": 2}


def test_undersample_ignores_absent_classes_and_handles_single_class():
    # No "A" or "C" rows at all: only the classes present count.
    classes = np.array(list("HHHNNNNN"))
    idx = undersample(classes, np.random.default_rng(1))
    assert Counter(classes[idx].tolist()) == {"H": 3, "N": 3}
    single = undersample(np.array(list("NNNN")), np.random.default_rng(1))
    assert sorted(single.tolist()) == [0, 1, 2, 3]


def test_undersample_draws_depend_on_rng():
    classes = np.repeat(np.array(["N", "H", "S"]), [200, 150, 100])
    draws = {tuple(undersample(classes, np.random.default_rng(seed))) for seed in range(4)}
    assert len(draws) == 4
    # Same rng state, same draw.
    a = undersample(classes, np.random.default_rng(7))
    b = undersample(classes, np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)


def test_undersample_empty():
    out = undersample(np.array([], dtype=str), np.random.default_rng(0))
    assert out.shape == (0,) and out.dtype.kind == "i"


def test_epoch_sampler_changes_per_epoch_and_repeats_within_epoch():
    sampler = EpochSampler(CLASSES, seed=3)
    first = list(sampler)
    assert list(sampler) == first
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first
    assert Counter(CLASSES[second].tolist()) == {"N": 2, "H": 2, "S": 2, "X": 2}


def test_epoch_sampler_state_dict_resumes_same_draws():
    uninterrupted = EpochSampler(CLASSES, seed=11)
    for epoch in range(3):
        uninterrupted.set_epoch(epoch)
        list(uninterrupted)
    uninterrupted.set_epoch(3)
    state = uninterrupted.state_dict()

    resumed = EpochSampler(CLASSES, seed=999)
    resumed.load_state_dict(state)
    assert list(resumed) == list(uninterrupted)
    uninterrupted.set_epoch(4)
    resumed.set_epoch(4)
    assert list(resumed) == list(uninterrupted)


@pytest.mark.parametrize("undersampled", [True, False])
def test_epoch_sampler_two_ranks_partition_the_single_process_epoch(undersampled):
    # 3 classes x 3 rows undersampled (or all 11 rows): odd sizes force padding.
    classes = np.array(list("NNNNNHHHSSS"))
    single = EpochSampler(classes, undersample=undersampled, seed=5)
    single.set_epoch(2)
    whole = list(single)
    assert len(whole) == len(single)

    shards = []
    for rank in range(2):
        s = EpochSampler(classes, undersample=undersampled, seed=5, rank=rank, world_size=2)
        s.set_epoch(2)
        shards.append(list(s))
        assert len(shards[-1]) == len(s)
    assert len(shards[0]) == len(shards[1]) == -(-len(whole) // 2)
    # Without padding the interleaved shards are exactly the single-process order.
    unpadded = [shards[r][i] for i in range(len(shards[0])) for r in range(2)][: len(whole)]
    assert unpadded == whole
    assert set(whole) == set(shards[0]) | set(shards[1])
    assert not set(whole[0::2]) & set(whole[1::2])


def test_epoch_sampler_drop_last_truncates():
    classes = np.array(list("NNNNNHHHSSS"))  # 9 undersampled rows
    lengths = []
    for rank in range(2):
        s = EpochSampler(classes, seed=0, rank=rank, world_size=2, drop_last=True)
        lengths.append((len(list(s)), len(s)))
    assert lengths == [(4, 4), (4, 4)]


def test_epoch_sampler_without_undersampling_is_a_permutation():
    sampler = EpochSampler(CLASSES, undersample=False, seed=2)
    order = list(sampler)
    assert sorted(order) == list(range(len(CLASSES)))
    assert order != sorted(order)
    assert len(sampler) == len(CLASSES)


def test_epoch_sampler_rejects_bad_rank():
    with pytest.raises(ValueError):
        EpochSampler(CLASSES, rank=2, world_size=2)


def test_is_ox():
    np.testing.assert_array_equal(
        is_ox(np.array(["N", "O", "X", "H", "A"])), [False, True, True, False, False]
    )


# Rows 0-3 are Train, 4-6 Development, 7-8 Test1.
SPLITS = np.array(["Train"] * 4 + ["Development"] * 3 + ["Test1"] * 2)
EMOTIONS = np.array(["N", "O", "H", "X", "S", "O", "X", "O", "N"])
DEV = {4, 5, 6}


@pytest.mark.parametrize(
    ("mode", "train", "dev_eval"),
    [
        ("keep", {0, 1, 2, 3}, DEV),
        ("drop", {0, 2}, DEV),
        ("only", {1, 3}, DEV),
        ("train+dev", {0, 1, 2, 3, 5, 6}, {4}),
        ("train+dev-nonox", {1, 3, 5, 6}, {4}),
    ],
)
def test_select_training_modes(mode, train, dev_eval):
    train_idx, dev_idx = select_training(SPLITS, EMOTIONS, mode)
    assert set(train_idx.tolist()) == train and len(train_idx) == len(train)
    assert set(dev_idx.tolist()) == dev_eval and len(dev_idx) == len(dev_eval)
    assert not set(train_idx.tolist()) & set(dev_idx.tolist())


def test_select_training_covers_all_modes_and_custom_split_names():
    assert {"keep", "drop", "only", "train+dev", "train+dev-nonox"} == set(OX_MODES)
    splits = np.where(SPLITS == "Development", "dev", SPLITS)
    train_idx, dev_idx = select_training(splits, EMOTIONS, "train+dev", dev_split="dev")
    assert set(train_idx.tolist()) == {0, 1, 2, 3, 5, 6} and dev_idx.tolist() == [4]


def test_select_training_unknown_mode_lists_valid_modes():
    with pytest.raises(ValueError, match="train\\+dev-nonox"):
        select_training(SPLITS, EMOTIONS, "all")
