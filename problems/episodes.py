"""Seeded N-way K-shot episodes (tasks) over a labelled corpus, with held-out test tasks.

A task t draws ``n_way`` distinct classes c_{t,0}, ..., c_{t,n_way-1} in a random order (the
per-task permutation), then for each class k_support + k_query distinct samples of that class:

    support_t = [k_support samples of c_{t,0}, ..., k_support samples of c_{t,n_way-1}]
    query_t   = [k_query   samples of c_{t,0}, ..., k_query   samples of c_{t,n_way-1}]

and relabels class c_{t,j} as j. Support and query are disjoint within a task (samples may recur
across tasks, as in the official task builders). Since the order of the chosen classes is random,
the same class gets different labels in different tasks: a shared classifier head must adapt to
each task (Franceschi et al., ICML 2018; Vinyals et al., NeurIPS 2016 for the N-way K-shot protocol).

Train tasks and held-out test tasks share no sample (:func:`split_episodes`). What else they keep
apart is the ``held_out`` mode:

* ``"groups"``: the corpus has groups (Amazon review domains): a task draws a group first and
  then its classes and samples inside that group; test groups (``test_groups``, or a seeded
  ``test_share`` of them, at least one) never appear in train tasks (BO-REP: 3 held-out domains);
* ``"classes"``: at least 2 n_way classes (MNIST digits): the classes are split into train
  classes and test classes (max(n_way, C // 2) of them, seeded): few-shot learning of new classes;
* ``"samples"``: the test tasks draw the same classes from other samples: every class's samples
  (every (group, class) pair's, with groups) are split, stratified, into a train pool and a test
  pool (a ``test_share`` of each); SLIP (SNLI) and AdamBO (TREC) test this way.

``held_out=None`` applies the first that fits: "groups" with groups, "classes" with at least
2 n_way classes, "samples" otherwise.

Tasks are stored as LongTensors of shape (T, n_way * k), so a batch of task indices selects its
corpus indices in one indexing: ``episodes.support[batch]``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .options import check_int, check_real

SPLIT_MODES = ("groups", "classes", "samples")  #: the accepted ``held_out`` values (and None)
NAME = "episodes"  #: the prefix of the argument errors


@dataclass
class Episodes:
    """T tasks. ``support`` / ``query``: corpus indices, (T, n_way k_support) / (T, n_way k_query);
    ``support_labels`` / ``query_labels``: the task labels 0..n_way-1 of those samples (class-major:
    k samples of label 0, then of label 1, ...); ``classes``: (T, n_way) corpus class of each task
    label; ``groups``: the group of each task (None without groups)."""

    support: Tensor
    query: Tensor
    support_labels: Tensor
    query_labels: Tensor
    classes: Tensor
    groups: Optional[List[str]] = None

    def __len__(self) -> int:
        return self.support.shape[0]

    @property
    def n_way(self) -> int:
        return self.classes.shape[1]

    def sample_indices(self) -> np.ndarray:
        """Sorted corpus indices used by any task (support or query)."""
        return np.unique(torch.cat([self.support.reshape(-1), self.query.reshape(-1)]).cpu().numpy())

    def original_labels(self, which: str) -> Tensor:
        """Corpus classes of the ``which`` ("support" or "query") samples, shaped like them."""
        if which not in ("support", "query"):
            raise ValueError(f"which must be 'support' or 'query', got {which!r}")
        labels = self.support_labels if which == "support" else self.query_labels
        return self.classes.gather(1, labels)


@dataclass
class TaskSplit:
    """Train and test episodes and how they were kept apart (``mode`` in :data:`SPLIT_MODES`);
    ``train_keys`` / ``test_keys`` are the classes or groups of each side (None in "samples" mode)."""

    train: Episodes
    test: Episodes
    mode: str
    train_keys: Optional[list] = None
    test_keys: Optional[list] = None


def _eligible(labels: np.ndarray, pool: np.ndarray, classes: Sequence[int], needed: int, where: str) -> dict:
    """{class: its samples in pool}; ValueError naming the first class with fewer than ``needed``."""
    by_class = {}
    for c in classes:
        members = pool[labels[pool] == c]
        if len(members) < needed:
            raise ValueError(f"class {c}{where} has {len(members)} samples, fewer than "
                             f"k_support + k_query = {needed} needed by a task")
        by_class[int(c)] = members
    return by_class


def build_episodes(labels: np.ndarray, n_way: int, k_support: int, k_query: int, n_tasks: int, seed,
                   pool: Optional[np.ndarray] = None, classes: Optional[Sequence[int]] = None,
                   groups: Optional[Sequence[str]] = None) -> Episodes:
    """``n_tasks`` tasks over the samples ``pool`` (default: all) of the given ``classes``
    (default: every class present in the pool). With ``groups`` (one name per corpus sample),
    each task first draws a group uniformly among those present in the pool. Deterministic in
    ``seed`` (anything ``numpy.random.default_rng`` accepts).

    Raises ValueError when a class (of a group) has fewer than k_support + k_query samples or
    fewer than n_way classes are available."""
    for name, value in (("n_way", n_way), ("k_support", k_support), ("k_query", k_query), ("n_tasks", n_tasks)):
        check_int(NAME, name, value)
    labels = np.asarray(labels, dtype=np.int64)
    pool = np.arange(len(labels)) if pool is None else np.asarray(pool, dtype=np.int64)
    wanted = np.unique(labels[pool]) if classes is None else np.asarray(sorted(classes), dtype=np.int64)
    needed = k_support + k_query
    if groups is None:
        tables = {None: _eligible(labels, pool, wanted, needed, "")}
    else:
        group_of = np.asarray(groups, dtype=object)
        tables = {}
        for name in sorted(set(group_of[pool])):
            members = pool[group_of[pool] == name]
            present = [c for c in wanted if np.any(labels[members] == c)]
            tables[name] = _eligible(labels, members, present, needed, f" of group {name!r}")
    for key, table in tables.items():
        if len(table) < n_way:
            where = "" if key is None else f" in group {key!r}"
            raise ValueError(f"n_way={n_way} classes needed but only {len(table)}{where} are available "
                             f"(classes {sorted(table)})")
    rng = np.random.default_rng(seed)
    keys = list(tables)
    support, query, chosen, task_groups = [], [], [], []
    for _ in range(n_tasks):
        key = keys[rng.integers(len(keys))]
        table = tables[key]
        picked = rng.choice(np.asarray(sorted(table)), size=n_way, replace=False)  # random order
        draws = [rng.choice(table[int(c)], size=needed, replace=False) for c in picked]
        support.append(np.concatenate([d[:k_support] for d in draws]))
        query.append(np.concatenate([d[k_support:] for d in draws]))
        chosen.append(picked)
        task_groups.append(key)

    def labels_of(k: int) -> Tensor:
        return torch.arange(n_way).repeat_interleave(k).expand(n_tasks, -1).clone()

    return Episodes(torch.as_tensor(np.stack(support)), torch.as_tensor(np.stack(query)),
                    labels_of(k_support), labels_of(k_query), torch.as_tensor(np.stack(chosen)),
                    None if groups is None else task_groups)


def split_mode(held_out: Optional[str], n_classes: int, n_way: int, has_groups: bool) -> str:
    """The split mode for ``held_out`` (one of :data:`SPLIT_MODES`, or None for the automatic
    rule of the module docstring); ValueError when the corpus cannot be split that way."""
    if held_out is None:
        return "groups" if has_groups else "classes" if n_classes >= 2 * n_way else "samples"
    if held_out not in SPLIT_MODES:
        raise ValueError(f"held_out must be one of {SPLIT_MODES} or None, got {held_out!r}")
    if held_out == "groups" and not has_groups:
        raise ValueError("held_out='groups' needs a corpus with groups (e.g. amazon domains); this one "
                         "has none: use held_out='classes' or 'samples'")
    if held_out == "classes" and n_classes < 2 * n_way:
        raise ValueError(f"held_out='classes' needs at least 2 n_way = {2 * n_way} classes (n_way train and "
                         f"n_way test classes), the corpus has {n_classes}: use held_out='samples' or a "
                         f"smaller n_way")
    return held_out


def _group_pools(groups: Sequence[str], test_groups: Optional[Sequence[str]], test_share: float, rng):
    """(train pool, test pool, train groups, test groups) of a split by groups."""
    names = sorted(set(groups))
    if test_groups is None:
        count = min(len(names) - 1, max(1, int(round(test_share * len(names)))))
        test_keys = sorted(rng.choice(np.asarray(names, dtype=object), size=count, replace=False))
    else:
        unknown = sorted(set(test_groups) - set(names))
        if unknown:
            raise ValueError(f"test_groups {unknown} are not groups of the corpus; its groups: {names}")
        test_keys = sorted(set(test_groups))
    train_keys = [g for g in names if g not in set(test_keys)]
    if not train_keys or not test_keys:
        raise ValueError(f"need at least one train group and one test group, got groups {names} "
                         f"with test groups {test_keys}")
    in_test = np.isin(np.asarray(groups, dtype=object), np.asarray(test_keys, dtype=object))
    return np.flatnonzero(~in_test), np.flatnonzero(in_test), train_keys, test_keys


def _class_pools(labels: np.ndarray, n_way: int, rng):
    """(train pool, test pool, train classes, test classes) of a split by classes."""
    order = rng.permutation(np.unique(labels))
    n_test = max(n_way, len(order) // 2)
    test_keys, train_keys = sorted(order[:n_test].tolist()), sorted(order[n_test:].tolist())
    in_test = np.isin(labels, test_keys)
    return np.flatnonzero(~in_test), np.flatnonzero(in_test), train_keys, test_keys


def _sample_pools(labels: np.ndarray, groups: Optional[Sequence[str]], test_share: float, rng):
    """(train pool, test pool): a ``test_share`` of every class (of every group) goes to test."""
    strata = labels.astype(str)
    if groups is not None:
        strata = np.char.add(np.char.add(np.asarray(groups, dtype=str), "/"), strata)
    train_pool, test_pool = [], []
    for stratum in np.unique(strata):
        members = rng.permutation(np.flatnonzero(strata == stratum))
        cut = int(round(test_share * len(members)))
        test_pool.append(members[:cut])
        train_pool.append(members[cut:])
    return np.sort(np.concatenate(train_pool)), np.sort(np.concatenate(test_pool))


def split_episodes(labels: np.ndarray, n_way: int, k_support: int, k_query: int, n_train_tasks: int,
                   n_test_tasks: int, seed: int, groups: Optional[Sequence[str]] = None,
                   test_groups: Optional[Sequence[str]] = None, held_out: Optional[str] = None,
                   test_share: float = 0.25) -> TaskSplit:
    """Train and test episodes that share no sample, kept apart by ``held_out`` ("groups",
    "classes", "samples" or None: see the module docstring).

    ``test_groups`` names the held-out groups ("groups" mode only; default: a seeded
    ``test_share`` of them, at least one); ``test_share`` in (0, 1) is also the test share of
    every class in "samples" mode. Tasks of a grouped corpus stay inside one group in every mode."""
    check_real(NAME, "test_share", test_share, 0.0, 1.0, rule="a number in (0, 1)")
    labels = np.asarray(labels, dtype=np.int64)
    mode = split_mode(held_out, len(np.unique(labels)), n_way, groups is not None)
    if test_groups is not None and mode != "groups":
        raise ValueError(f"test_groups is only used with held_out='groups', got held_out={mode!r}")
    rng = np.random.default_rng([seed, 0])
    train_keys = test_keys = None
    if mode == "groups":
        train_pool, test_pool, train_keys, test_keys = _group_pools(groups, test_groups, test_share, rng)
    elif mode == "classes":
        train_pool, test_pool, train_keys, test_keys = _class_pools(labels, n_way, rng)
    else:
        train_pool, test_pool = _sample_pools(labels, groups, test_share, rng)
    sides = []
    for side, n_tasks, pool in (("train", n_train_tasks, train_pool), ("test", n_test_tasks, test_pool)):
        try:
            sides.append(build_episodes(labels, n_way, k_support, k_query, n_tasks, [seed, len(sides) + 1],
                                        pool=pool, groups=groups))
        except ValueError as error:
            share = f", test_share={test_share}" if mode != "classes" else ""
            raise ValueError(f"{side} tasks of the held_out={mode!r} split{share}: {error}") from error
    return TaskSplit(sides[0], sides[1], mode, train_keys, test_keys)
