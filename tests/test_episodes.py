"""Tests of the N-way K-shot episode builder (problems/episodes.py)."""
import numpy as np
import pytest
import torch

from bilevel.problems.corpora import load_corpus
from bilevel.problems.episodes import build_episodes, split_episodes
from data_fixtures import write_amazon


def balanced_labels(n_classes, per_class, seed=0):
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(n_classes), per_class))


def task_sets(episodes, t):
    return set(episodes.support[t].tolist()), set(episodes.query[t].tolist())


def check_tasks(episodes, labels, n_way, k_support, k_query, n_tasks):
    """Shapes, disjoint support / query, labels 0..n_way-1 with exactly k per label, and task
    label j <-> corpus class classes[t, j] for every sample."""
    assert episodes.support.shape == (n_tasks, n_way * k_support) and episodes.support.dtype == torch.long
    assert episodes.query.shape == (n_tasks, n_way * k_query)
    assert episodes.classes.shape == (n_tasks, n_way)
    for t in range(n_tasks):
        support, query = task_sets(episodes, t)
        assert len(support) == n_way * k_support and len(query) == n_way * k_query  # no repeats
        assert not support & query
        assert len(set(episodes.classes[t].tolist())) == n_way
        for which, k in (("support", k_support), ("query", k_query)):
            task_labels = getattr(episodes, f"{which}_labels")[t]
            assert torch.equal(torch.bincount(task_labels, minlength=n_way), torch.full((n_way,), k))
            corpus = torch.as_tensor(labels)[getattr(episodes, which)[t]]
            assert torch.equal(corpus, episodes.classes[t][task_labels])
            assert torch.equal(episodes.original_labels(which)[t], corpus)


def test_deterministic_under_a_seed_and_different_for_another():
    labels = balanced_labels(8, 20)
    a = build_episodes(labels, 3, 2, 4, 30, seed=5)
    b = build_episodes(labels, 3, 2, 4, 30, seed=5)
    c = build_episodes(labels, 3, 2, 4, 30, seed=6)
    for name in ("support", "query", "support_labels", "query_labels", "classes"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert not torch.equal(a.support, c.support)
    check_tasks(a, labels, 3, 2, 4, 30)


def test_batch_of_task_indices_selects_in_one_indexing():
    labels = balanced_labels(5, 12)
    episodes = build_episodes(labels, 2, 3, 2, 10, seed=0)
    batch = torch.tensor([4, 0, 4])
    assert episodes.support[batch].shape == (3, 6) and episodes.query[batch].shape == (3, 4)
    assert torch.equal(episodes.support[batch][0], episodes.support[4])


def test_per_task_permutation_varies():
    labels = balanced_labels(4, 30)
    episodes = build_episodes(labels, 4, 2, 2, 40, seed=1)  # every task holds all 4 classes
    orders = {tuple(row) for row in episodes.classes.tolist()}
    assert len(orders) > 5  # many different class -> label maps
    labels_of_class0 = {row.index(0) for row in episodes.classes.tolist()}
    assert labels_of_class0 == {0, 1, 2, 3}


def test_class_split_keeps_classes_and_samples_apart():
    labels = balanced_labels(10, 20, seed=2)
    split = split_episodes(labels, 3, 3, 2, n_train_tasks=25, n_test_tasks=15, seed=0)
    assert split.mode == "classes"
    assert len(split.test_keys) == 5 and len(split.train_keys) == 5
    assert not set(split.train_keys) & set(split.test_keys)
    assert set(split.train.classes.unique().tolist()) <= set(split.train_keys)
    assert set(split.test.classes.unique().tolist()) <= set(split.test_keys)
    assert not set(split.train.sample_indices()) & set(split.test.sample_indices())
    check_tasks(split.train, labels, 3, 3, 2, 25)
    check_tasks(split.test, labels, 3, 3, 2, 15)
    again = split_episodes(labels, 3, 3, 2, n_train_tasks=25, n_test_tasks=15, seed=0)
    assert torch.equal(again.test.query, split.test.query) and again.test_keys == split.test_keys
    other = split_episodes(labels, 3, 3, 2, n_train_tasks=25, n_test_tasks=15, seed=1)
    assert not torch.equal(other.train.support, split.train.support)


def test_sample_split_when_too_few_classes():
    labels = balanced_labels(3, 40, seed=3)  # like SNLI: 3 labels, tasks of 2
    split = split_episodes(labels, 2, 4, 4, n_train_tasks=30, n_test_tasks=10, seed=0)
    assert split.mode == "samples" and split.train_keys is None
    train, test = set(split.train.sample_indices()), set(split.test.sample_indices())
    assert not train & test
    assert set(split.test.classes.unique().tolist()) == {0, 1, 2}  # same classes, other samples
    check_tasks(split.train, labels, 2, 4, 4, 30)
    check_tasks(split.test, labels, 2, 4, 4, 10)


def test_group_split_on_amazon_fixture(tmp_path):
    corpus = load_corpus("amazon", str(write_amazon(tmp_path / "dataset.json")))
    groups = np.asarray(corpus.groups, dtype=object)
    split = split_episodes(corpus.labels, 2, 3, 3, n_train_tasks=20, n_test_tasks=8, seed=0, groups=corpus.groups)
    assert split.mode == "groups" and len(split.test_keys) == 2 and len(split.train_keys) == 4
    assert set(split.train.groups) <= set(split.train_keys) and set(split.test.groups) <= set(split.test_keys)
    for episodes, allowed in ((split.train, split.train_keys), (split.test, split.test_keys)):
        for t in range(len(episodes)):
            support, query = task_sets(episodes, t)
            assert set(groups[sorted(support | query)]) == {episodes.groups[t]}  # one group per task
        assert set(groups[episodes.sample_indices()]) <= set(allowed)
    check_tasks(split.test, corpus.labels, 2, 3, 3, 8)
    named = split_episodes(corpus.labels, 2, 3, 3, 20, 8, seed=0, groups=corpus.groups, test_groups=["toys"])
    assert named.test_keys == ["toys"] and set(named.test.groups) == {"toys"}
    assert "toys" not in set(groups[named.train.sample_indices()])
    with pytest.raises(ValueError, match="test_groups.*garden"):
        split_episodes(corpus.labels, 2, 3, 3, 20, 8, seed=0, groups=corpus.groups, test_groups=["garden"])


def test_too_few_samples_names_the_class():
    labels = np.concatenate([np.repeat([0, 1, 2], 10), np.full(4, 3)])
    with pytest.raises(ValueError, match=r"class 3 has 4 samples.*k_support \+ k_query = 6"):
        build_episodes(labels, 2, 3, 3, 5, seed=0)
    build_episodes(labels, 2, 2, 2, 5, seed=0)  # 4 samples suffice for 2 + 2
    groups = ["a"] * 34
    with pytest.raises(ValueError, match="class 3 of group 'a'"):
        build_episodes(labels, 2, 3, 3, 5, seed=0, groups=groups)


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_way=5), "n_way=5 classes needed but only 4"),
    (dict(n_way=0), "n_way"),
    (dict(k_support=0), "k_support"),
    (dict(n_tasks=2.5), "n_tasks"),
])
def test_invalid_arguments(kwargs, message):
    settings = dict(labels=balanced_labels(4, 10), n_way=2, k_support=2, k_query=2, n_tasks=3, seed=0)
    settings.update(kwargs)
    with pytest.raises(ValueError, match=message):
        build_episodes(**settings)


def test_test_share_must_be_a_fraction():
    with pytest.raises(ValueError, match="test_share"):
        split_episodes(balanced_labels(2, 20), 2, 2, 2, 5, 5, seed=0, test_share=1.0)


def test_automatic_rule_without_held_out():
    assert split_episodes(balanced_labels(10, 20), 3, 2, 2, 5, 5, seed=0).mode == "classes"
    assert split_episodes(balanced_labels(5, 20), 3, 2, 2, 5, 5, seed=0).mode == "samples"  # 5 < 2 * 3


@pytest.mark.parametrize("share", [0.25, 0.5])
def test_held_out_samples_keeps_every_class_on_both_sides(share):
    labels = balanced_labels(10, 20, seed=4)  # enough classes for a class split, samples asked for
    split = split_episodes(labels, 3, 2, 2, n_train_tasks=60, n_test_tasks=40, seed=0, held_out="samples",
                           test_share=share)
    assert split.mode == "samples" and split.train_keys is None and split.test_keys is None
    train, test = split.train.sample_indices(), split.test.sample_indices()
    assert not set(train.tolist()) & set(test.tolist())
    assert set(split.train.classes.unique().tolist()) == set(split.test.classes.unique().tolist()) == set(range(10))
    # the test pool is the given share of every class: test tasks use at most that many per class
    assert np.bincount(labels[test], minlength=10).max() <= round(share * 20)
    check_tasks(split.test, labels, 3, 2, 2, 40)


def test_held_out_classes_on_request():
    labels = balanced_labels(6, 20, seed=5)
    split = split_episodes(labels, 3, 2, 2, n_train_tasks=20, n_test_tasks=10, seed=0, held_out="classes")
    assert split.mode == "classes" and len(split.train_keys) == len(split.test_keys) == 3
    assert not set(split.train.classes.unique().tolist()) & set(split.test.classes.unique().tolist())
    assert not set(split.train.sample_indices()) & set(split.test.sample_indices())


@pytest.fixture
def amazon(tmp_path):
    corpus = load_corpus("amazon", str(write_amazon(tmp_path / "dataset.json")))
    return corpus, np.asarray(corpus.groups, dtype=object)


def test_held_out_samples_with_groups_splits_every_group(amazon):
    corpus, groups = amazon
    split = split_episodes(corpus.labels, 2, 2, 2, 40, 30, seed=0, groups=corpus.groups, held_out="samples")
    assert split.mode == "samples"
    train, test = split.train.sample_indices(), split.test.sample_indices()
    assert not set(train.tolist()) & set(test.tolist())
    assert set(groups[test]) == set(groups[train]) == set(groups)  # every domain on both sides
    for t in range(len(split.test)):
        support, query = task_sets(split.test, t)
        assert set(groups[sorted(support | query)]) == {split.test.groups[t]}


def test_held_out_groups_on_request(amazon):
    corpus, groups = amazon
    split = split_episodes(corpus.labels, 2, 3, 3, 20, 8, seed=0, groups=corpus.groups, held_out="groups")
    assert split.mode == "groups"
    assert not set(groups[split.train.sample_indices()]) & set(groups[split.test.sample_indices()])


@pytest.mark.parametrize("kwargs, message", [
    (dict(held_out="domains"), r"held_out must be one of \('groups', 'classes', 'samples'\) or None"),
    (dict(held_out="groups"), "held_out='groups' needs a corpus with groups"),
    (dict(held_out="classes", n_way=3), r"held_out='classes' needs at least 2 n_way = 6 classes.*has 4"),
    (dict(test_groups=["a"]), "test_groups is only used with held_out='groups'"),
    (dict(held_out="samples", k_support=3, k_query=3), r"test tasks of the held_out='samples' split, "
                                                       r"test_share=0.25: class \d has 2 samples"),
])
def test_impossible_splits_raise(kwargs, message):
    settings = dict(labels=balanced_labels(4, 10), n_way=2, k_support=1, k_query=1, n_train_tasks=3,
                    n_test_tasks=3, seed=0)
    settings.update(kwargs)
    with pytest.raises(ValueError, match=message):
        split_episodes(**settings)
