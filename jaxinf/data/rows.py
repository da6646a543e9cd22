"""Rows: ``{"prompt": str, "response": str, "group": str}`` dicts, and ``load_rows`` to read them.

``group`` is the ground-truth group of a row (the study's ``variation`` column): a test row's
influential training rows are the training rows of the same group.
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from pathlib import Path
from typing import TypedDict

import numpy as np

from jaxinf.data.generators import GENERATOR_NAMES, generate, resolve_generator

STUDY_DATASETS = "../shared/paper_datasets"


class Row(TypedDict):
    prompt: str
    response: str
    group: str


def _source_kinds() -> str:
    return ("load_rows accepts (a) a folder saved with DatasetDict.save_to_disk, e.g. the study's "
            f"'{STUDY_DATASETS}/<name>' (mixedS, mixedL, emotion, grammars, math, backdoor, multibackdoor, "
            "multibackdoor5), (b) a .jsonl, .json or .csv file, or (c) a built-in generator name: "
            f"{GENERATOR_NAMES}.")


class DataError(ValueError):
    """A mistake in the user's data or data options; the message is one line naming the file, the row or
    line, the field and the fix (binaries turn it into ``absl.app.UsageError``)."""


WHOLE = "all"  # the split name that means "every row of a file without splits"


def _read_file(path: Path) -> tuple[list[dict], str, list[str]]:
    """Records of a .jsonl/.json/.csv file, what they came from, and where each one is (for messages)."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records, where = [], []
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg}, column {e.colno}); fix line "
                                    f"{lineno}: each line of a .jsonl file must be one JSON object.") from None
                if not isinstance(rec, dict):
                    raise DataError(f"{path}:{lineno}: line {lineno} holds a JSON {type(rec).__name__}, not an "
                                    "object; make each line one object such as {\"prompts\": ..., \"response\": ...}.")
                records.append(rec)
                where.append(f"{path}:{lineno}")
        return records, "records", where
    if suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as f:
            records = list(csv.DictReader(f))
        return records, "records", [f"{path}:{i + 2}" for i in range(len(records))]  # line 1 is the header
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg}, column {e.colno}); fix line "
                            f"{e.lineno} of the file.") from None
        if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()):
            return data, "split dict", []  # {"train": [...], "test": [...]}
        if isinstance(data, list):
            return data, "records", [f"{path} record {i}" for i in range(len(data))]
        raise DataError(f"{path}: a .json source must hold a list of objects or an object mapping "
                        "split names to lists of objects.")
    raise DataError(f"{path}: unsupported file type {suffix!r}. " + _source_kinds())


def _no_split_error(where: str, split: str) -> DataError:
    return DataError(
        f"{where} has no splits (no 'split' column), so split {split!r} would be the whole file and every test "
        "row would also be a training row. Fix: pass --test_data=FILE (test rows in a second file) or "
        "--test_fraction=0.2 (a seeded held-out part, stratified by group), or add a 'split' column "
        f"('train'/'test') [library: load_splits(..., test_data=... or test_fraction=...), or split={WHOLE!r} "
        "for every row].")


def _split_records(records, kind: str, split: str, where: str, locations: list[str]):
    """Select ``split`` from file records (and their locations): a split dict's key, or a ``split`` column
    when present; a file without splits only answers ``split="all"`` (anything else would leak)."""
    if kind == "split dict":
        if split not in records:
            raise DataError(f"{where}: no split {split!r}; available splits: {sorted(records)}. "
                            "Set split=... to one of them.")
        return records[split], [f"{where} {split}[{i}]" for i in range(len(records[split]))]
    if records and isinstance(records[0], dict) and "split" in records[0]:
        if split == WHOLE:
            return records, locations
        keep = [i for i, r in enumerate(records) if r.get("split") == split]
        if not keep:
            raise DataError(f"{where}: split {split!r} is empty; available splits (from the 'split' "
                            f"column): {sorted(Counter(r.get('split') for r in records).items())}. "
                            "Set split=... to one of them.")
        return [records[i] for i in keep], [locations[i] for i in keep]
    if split != WHOLE:
        raise _no_split_error(where, split)
    return records, locations


def has_splits(source) -> bool:
    """Whether ``source`` (as ``load_rows`` takes it) holds its own train/test splits: a generator, a folder
    with a DatasetDict, a .json split dict, or a file with a ``split`` column."""
    path = Path(os.fspath(source))
    if not path.exists():
        return resolve_generator(str(source)) is not None
    if path.is_dir():
        import datasets
        try:
            return isinstance(datasets.load_from_disk(str(path)), datasets.DatasetDict)
        except FileNotFoundError:
            return False
    records, kind, _ = _read_file(path)
    return kind == "split dict" or bool(records and isinstance(records[0], dict) and "split" in records[0])


def _from_disk(path: Path, split: str):
    import datasets
    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise DataError(f"{path} is a folder but not one saved with save_to_disk ({e}). "
                        + _source_kinds()) from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds or ds[split].num_rows == 0:
            problem = "no split" if split not in ds else "empty split"
            raise DataError(f"{path}: {problem} {split!r}; available splits (rows): "
                            f"{ {k: v.num_rows for k, v in ds.items()} }. Set split=... to a non-empty one.")
        ds = ds[split]
        return ds.to_list(), list(ds.column_names), [f"{path} {split}[{i}]" for i in range(ds.num_rows)]
    if split != WHOLE:  # a single saved Dataset has no splits either
        raise _no_split_error(str(path), split)
    return ds.to_list(), list(ds.column_names), [f"{path} row {i}" for i in range(ds.num_rows)]


_FLAG = {"prompt_column": "--prompt_column", "response_column": "--response_column",
         "group_column": "--group_column"}


def _to_rows(records: list[dict], columns: list[str], where: str, split: str,
             mapping: dict[str, str], locations: list[str]) -> list[Row]:
    if not records:
        raise DataError(f"{where}: split {split!r} has no rows.")
    for option, col in mapping.items():
        if col not in columns:
            raise DataError(f"{where}: missing column {col!r} (set by {option}=..., flag {_FLAG[option]}); "
                            f"columns present: {columns}. Pass {option}='<one of those>' "
                            f"({_FLAG[option]}=<one of those> on the command line).")
    rows = []
    for i, rec in enumerate(records):
        row = {}
        for (option, col), key in zip(mapping.items(), ("prompt", "response", "group")):
            value = rec.get(col)
            if not isinstance(value, str):
                what = "is missing or null" if value is None else f"holds {type(value).__name__} {value!r}"
                loc = locations[i] if i < len(locations) else where
                raise DataError(f"{loc}: row {i} column {col!r} ({option}) {what}, expected str. "
                                "Make every value of that column a string (e.g. str(label) for numeric "
                                "groups) before loading.")
            row[key] = value
        rows.append(row)
    return rows


def stratified_subsample(rows: list[Row], limit: int, seed: int = 0) -> list[Row]:
    """Deterministic subsample of ``limit`` rows keeping group proportions (largest-remainder quotas,
    each non-empty group keeps at least one row while ``limit`` allows); original order is kept."""
    return [rows[i] for i in stratified_subsample_indices(rows, limit, seed)]


def stratified_subsample_indices(rows: list[Row], limit: int, seed: int = 0) -> list[int]:
    """The sorted row indices ``stratified_subsample`` keeps."""
    if not isinstance(limit, int) or limit < 1:
        raise DataError(f"limit must be a positive int or None, got {limit!r}; pass --limit_train/--limit_test "
                        "as a positive number of rows.")
    if limit >= len(rows):
        return list(range(len(rows)))
    groups = sorted(Counter(r["group"] for r in rows).items())
    exact = np.array([n * limit / len(rows) for _, n in groups])
    quota = np.floor(exact).astype(int)
    if limit >= len(groups):
        quota = np.maximum(quota, 1)
    order = np.argsort(-(exact - np.floor(exact)), kind="stable")
    i = 0
    while quota.sum() < limit:  # hand the remaining rows to the largest remainders
        g = order[i % len(groups)]
        quota[g] += quota[g] < groups[g][1]
        i += 1
    while quota.sum() > limit:  # the at-least-one floor overshot: trim the largest groups
        quota[np.argmax(quota)] -= 1
    rng = np.random.default_rng(seed)
    keep = []
    for (name, _), q in zip(groups, quota):
        idx = [i for i, r in enumerate(rows) if r["group"] == name]
        keep.extend(rng.choice(idx, size=q, replace=False).tolist())
    return sorted(keep)


def load_rows(source, split: str = "train", *, prompt_column: str = "prompts",
              response_column: str = "response", group_column: str = "variation",
              limit: int | None = None, seed: int = 0, **generator_kwargs) -> list[Row]:
    """Load rows from a study folder, a data file, or a built-in generator.

    Args:
      source: (a) a folder saved with ``save_to_disk`` (a DatasetDict; a single Dataset has no splits);
        e.g. ``"../shared/paper_datasets/mixedS"``; (b) a ``.jsonl`` / ``.csv`` file of records or a ``.json``
        file holding a list of records or ``{split: [records]}``; a ``split`` column, when present, selects
        the split; (c) a generator name (``harmful``, ``classes``, ``backdoor``, ``backdoor3``, ...) — its
        kwargs pass through ``generator_kwargs``. An existing path wins over a generator of the same name.
      split: which split to return. A source without splits (a file without a ``split`` column, a single
        Dataset) only answers ``split="all"`` (every row); any other name is a DataError, because returning
        the whole file as both "train" and "test" would leak every test row into training. Use
        ``jaxinf.data.load_splits`` (``test_data=`` / ``test_fraction=``) to get disjoint splits.
      prompt_column, response_column, group_column: the source's column names (files and folders;
        generators already yield rows).
      limit: if set, a deterministic stratified subsample of that many rows (``seed``).
      seed: the generator's seed and the subsample's seed.
    """
    rows, _ = load_rows_with_locations(source, split, prompt_column=prompt_column,
                                       response_column=response_column, group_column=group_column,
                                       limit=limit, seed=seed, **generator_kwargs)
    return rows


def load_rows_with_locations(source, split: str = "train", *, prompt_column: str = "prompts",
                             response_column: str = "response", group_column: str = "variation",
                             limit: int | None = None, seed: int = 0,
                             **generator_kwargs) -> tuple[list[Row], list[str]]:
    """``load_rows`` and, per row, where it came from (``file:line``, ``folder split[i]``, ...) for messages."""
    path = Path(os.fspath(source))
    found = resolve_generator(str(source)) if not path.exists() else None
    if found is not None:
        data = generate(str(source), seed=seed, **generator_kwargs)
        if split not in data:
            raise DataError(f"generator {source!r} has no split {split!r}; available splits: {sorted(data)}.")
        rows = data[split]
        locations = [f"generator {source!r} {split}[{i}]" for i in range(len(rows))]
    else:
        if generator_kwargs:
            raise TypeError(f"unexpected arguments {sorted(generator_kwargs)}: they only apply to "
                            "generator sources.")
        if not path.exists():
            study = Path(__file__).resolve().parents[3] / "shared" / "paper_datasets" / path.name
            hint = f" Did you mean {str(study)!r}?" if study.is_dir() else ""
            raise DataError(f"no such file, folder or generator: {str(source)!r}.{hint} " + _source_kinds())
        mapping = {"prompt_column": prompt_column, "response_column": response_column,
                   "group_column": group_column}
        if path.is_dir():
            records, columns, locations = _from_disk(path, split)
        else:
            records, kind, locations = _read_file(path)
            records, locations = _split_records(records, kind, split, str(path), locations)
            columns = list(records[0]) if records else []
        rows = _to_rows(records, columns, str(path), split, mapping, locations)
    if not rows:
        raise DataError(f"{source!r}: split {split!r} has no rows.")
    if limit is not None:
        keep = stratified_subsample_indices(rows, limit, seed)
        rows, locations = [rows[i] for i in keep], [locations[i] for i in keep]
    return rows, locations
