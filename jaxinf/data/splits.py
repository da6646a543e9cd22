"""Train and test rows that cannot leak into each other, and the checks a researcher's own data needs.

``load_splits`` returns disjoint train/test rows from one of three layouts:

* ``"splits"``: the source has its own splits (a study folder, a generator, a ``split`` column, a .json
  ``{"train": [...], "test": [...]}``);
* ``"test_data"``: training rows from ``source`` (its ``train`` split if it has splits, else every row),
  test rows from a second source ``test_data`` (its ``test`` split if it has splits, else every row);
* ``"test_fraction"``: one source without splits; for each group, ``round(fraction * n_g)`` rows (at least
  one, at most ``n_g - 1``) are held out for test, chosen by a permutation seeded with ``seed``; the rest
  are training rows. A row index is never in both.

Then, on the rows actually used (after ``limit_*`` subsampling):

* test rows whose (prompt, response) pair equals a training row's are counted (``overlap``); more than
  zero is a DataError unless ``allow_overlap`` (the count is then kept in ``info``);
* a test row whose group has no training row is a DataError (attribution to "its" group is undefined).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Optional

import numpy as np

from jaxinf.data.rows import (WHOLE, DataError, Row, has_splits, load_rows_with_locations,
                              stratified_subsample_indices)


@dataclasses.dataclass(frozen=True)
class Splits:
    """Disjoint train/test rows, where each row came from, and how the split was made (``info``)."""

    train: list
    test: list
    train_where: list
    test_where: list
    info: dict


def held_out_indices(groups, fraction: float, seed: int, where: Optional[list] = None) -> np.ndarray:
    """Boolean mask [N]: True = test. Per group g with n_g rows, ``clip(round(fraction * n_g), 1, n_g - 1)``
    rows chosen by ``default_rng([seed, k]).permutation`` (k = the group's rank in sorted order), so the same
    seed gives the same split whatever the row order within other groups."""
    if not (isinstance(fraction, float) or isinstance(fraction, int)) or not 0.0 < fraction < 1.0:
        raise DataError(f"--test_fraction={fraction!r} must lie strictly between 0 and 1 (e.g. 0.2).")
    groups = np.asarray(groups, dtype=object)
    test = np.zeros(len(groups), bool)
    for k, (name, n) in enumerate(sorted(Counter(groups.tolist()).items())):
        idx = np.flatnonzero(groups == name)
        if n < 2:
            loc = where[idx[0]] if where else f"row {idx[0]}"
            raise DataError(f"{loc}: group {name!r} (--group_column) has one row, so it cannot be both trained on "
                            "and held out by --test_fraction; add rows of that group, drop the row, or pass "
                            "its test rows with --test_data.")
        n_test = int(np.clip(round(fraction * n), 1, n - 1))
        test[idx[np.random.default_rng([seed, k]).permutation(n)[:n_test]]] = True
    return test


def overlap_pairs(train: list, test: list) -> list[tuple[int, int]]:
    """(test index, first training index) of every test row whose (prompt, response) equals a training row's."""
    first = {}
    for i, r in enumerate(train):
        first.setdefault((r["prompt"], r["response"]), i)
    return [(j, first[(r["prompt"], r["response"])]) for j, r in enumerate(test)
            if (r["prompt"], r["response"]) in first]


def check_test_groups(train: list, test: list, test_where: list) -> None:
    """A test row whose group has no training row is a DataError naming the row and the fix."""
    seen = {r["group"] for r in train}
    missing = [j for j, r in enumerate(test) if r["group"] not in seen]
    if missing:
        j = missing[0]
        raise DataError(f"{test_where[j]}: test group {test[j]['group']!r} (--group_column) has no training row "
                        f"({len(missing)} test row(s) affected; training groups: {sorted(seen)}); add training rows "
                        "of that group or drop those test rows (a smaller --limit_train can also drop a group).")


def load_splits(source, *, test_data=None, test_fraction: Optional[float] = None,
                prompt_column: str = "prompts", response_column: str = "response",
                group_column: str = "variation", limit_train: Optional[int] = None,
                limit_test: Optional[int] = None, seed: int = 0, allow_overlap: bool = False) -> Splits:
    """Disjoint train and test rows (see the module doc); ``info`` says which layout, the sizes and the overlap.

    Raises DataError (one line: file, row/line, field, fix) for a source without splits and neither
    ``test_data`` nor ``test_fraction``, both given, a group of one row under ``test_fraction``, a test group
    absent from training, and train/test duplicates unless ``allow_overlap``.
    """
    cols = dict(prompt_column=prompt_column, response_column=response_column, group_column=group_column)
    if test_data is not None and test_fraction is not None:
        raise DataError("pass one of --test_data (test rows in a second file) and --test_fraction (held-out "
                        "part of --data), not both.")
    if test_data is not None:
        train, train_where = load_rows_with_locations(source, "train" if has_splits(source) else WHOLE,
                                                      seed=seed, **cols)
        test, test_where = load_rows_with_locations(test_data, "test" if has_splits(test_data) else WHOLE,
                                                    seed=seed, **cols)
        mode, how = "test_data", f"training rows from {source}, test rows from {test_data} (--test_data)"
    elif test_fraction is not None:
        if has_splits(source):
            raise DataError(f"{source} already has train/test splits; drop --test_fraction (it only splits a "
                            "file without a 'split' column).")
        rows, where = load_rows_with_locations(source, WHOLE, seed=seed, **cols)
        mask = held_out_indices([r["group"] for r in rows], test_fraction, seed, where)
        train = [r for r, m in zip(rows, mask) if not m]
        test = [r for r, m in zip(rows, mask) if m]
        train_where = [w for w, m in zip(where, mask) if not m]
        test_where = [w for w, m in zip(where, mask) if m]
        mode = "test_fraction"
        how = (f"{source} split by --test_fraction={test_fraction} (stratified by group, seed {seed}): "
               f"{len(test)} of {len(rows)} rows held out for test")
    else:
        train, train_where = load_rows_with_locations(source, "train", seed=seed, **cols)
        test, test_where = load_rows_with_locations(source, "test", seed=seed, **cols)
        mode, how = "splits", f"the train and test splits of {source}"
    if limit_train is not None:
        keep = stratified_subsample_indices(train, limit_train, seed)
        train, train_where = [train[i] for i in keep], [train_where[i] for i in keep]
    if limit_test is not None:
        keep = stratified_subsample_indices(test, limit_test, seed)
        test, test_where = [test[i] for i in keep], [test_where[i] for i in keep]
    check_test_groups(train, test, test_where)
    pairs = overlap_pairs(train, test)
    if pairs and not allow_overlap:
        j, i = pairs[0]
        raise DataError(f"{test_where[j]}: {len(pairs)} test row(s) have the same prompt and response as a training "
                        f"row (this one equals {train_where[i]}), so attribution would find the copy; remove the "
                        "duplicates, or pass --allow_overlap to keep them (the count goes in results.json).")
    info = {"mode": mode, "description": f"data: {how}; {len(train)} train, {len(test)} test rows"
                                         + (f", {len(pairs)} test rows duplicate a training row" if pairs else ""),
            "n_train": len(train), "n_test": len(test), "overlap": len(pairs),
            "test_fraction": test_fraction, "test_data": None if test_data is None else str(test_data)}
    return Splits(train, test, train_where, test_where, info)
