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


def _read_file(path: Path) -> tuple[list[dict], str]:
    """Records of a .jsonl/.json/.csv file and what they came from (for messages)."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()], "records"
    if suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f)), "records"
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()):
            return data, "split dict"  # {"train": [...], "test": [...]}
        if isinstance(data, list):
            return data, "records"
        raise ValueError(f"{path}: a .json source must hold a list of objects or an object mapping "
                         "split names to lists of objects.")
    raise ValueError(f"{path}: unsupported file type {suffix!r}. " + _source_kinds())


def _split_records(records, kind: str, split: str, where: str) -> list[dict]:
    """Select ``split`` from file records: a split dict's key, or a ``split`` column when present;
    otherwise the whole file is the split."""
    if kind == "split dict":
        if split not in records:
            raise ValueError(f"{where}: no split {split!r}; available splits: {sorted(records)}. "
                             "Set split=... to one of them.")
        return records[split]
    if records and isinstance(records[0], dict) and "split" in records[0]:
        chosen = [r for r in records if r.get("split") == split]
        if not chosen:
            raise ValueError(f"{where}: split {split!r} is empty; available splits (from the 'split' "
                             f"column): {sorted(Counter(r.get('split') for r in records).items())}. "
                             "Set split=... to one of them.")
        return chosen
    return records


def _from_disk(path: Path, split: str):
    import datasets
    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise ValueError(f"{path} is a folder but not one saved with save_to_disk ({e}). "
                         + _source_kinds()) from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds or ds[split].num_rows == 0:
            problem = "no split" if split not in ds else "empty split"
            raise ValueError(f"{path}: {problem} {split!r}; available splits (rows): "
                             f"{ {k: v.num_rows for k, v in ds.items()} }. Set split=... to a non-empty one.")
        ds = ds[split]
    return ds.to_list(), list(ds.column_names)


def _to_rows(records: list[dict], columns: list[str], where: str, split: str,
             mapping: dict[str, str]) -> list[Row]:
    if not records:
        raise ValueError(f"{where}: split {split!r} has no rows.")
    for option, col in mapping.items():
        if col not in columns:
            raise ValueError(f"{where}: missing column {col!r} (set by {option}=...); columns present: "
                             f"{columns}. Pass {option}='<one of those>'.")
    rows = []
    for i, rec in enumerate(records):
        row = {}
        for (option, col), key in zip(mapping.items(), ("prompt", "response", "group")):
            value = rec.get(col)
            if not isinstance(value, str):
                what = "is missing or null" if value is None else f"holds {type(value).__name__} {value!r}"
                raise ValueError(f"{where}: row {i} column {col!r} ({option}) {what}, expected str. "
                                 "Make every value of that column a string (e.g. str(label) for numeric "
                                 "groups) before loading.")
            row[key] = value
        rows.append(row)
    return rows


def stratified_subsample(rows: list[Row], limit: int, seed: int = 0) -> list[Row]:
    """Deterministic subsample of ``limit`` rows keeping group proportions (largest-remainder quotas,
    each non-empty group keeps at least one row while ``limit`` allows); original order is kept."""
    if not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a positive int or None, got {limit!r}.")
    if limit >= len(rows):
        return list(rows)
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
    return [rows[i] for i in sorted(keep)]


def load_rows(source, split: str = "train", *, prompt_column: str = "prompts",
              response_column: str = "response", group_column: str = "variation",
              limit: int | None = None, seed: int = 0, **generator_kwargs) -> list[Row]:
    """Load rows from a study folder, a data file, or a built-in generator.

    Args:
      source: (a) a folder saved with ``save_to_disk`` (a DatasetDict, or a single Dataset which is
        then the split whatever its name), e.g. ``"../shared/paper_datasets/mixedS"``; (b) a
        ``.jsonl`` / ``.csv`` file of records or a ``.json`` file holding a list of records or
        ``{split: [records]}``; a ``split`` column, when present, selects the split, else the whole
        file is the split (any ``split`` name returns it); (c) a generator name (``harmful``,
        ``classes``, ``backdoor``, ``backdoor3``, ...) — its kwargs pass through ``generator_kwargs``.
        An existing path wins over a generator of the same name.
      split: which split to return.
      prompt_column, response_column, group_column: the source's column names (files and folders;
        generators already yield rows).
      limit: if set, a deterministic stratified subsample of that many rows (``seed``).
      seed: the generator's seed and the subsample's seed.
    """
    path = Path(os.fspath(source))
    found = resolve_generator(str(source)) if not path.exists() else None
    if found is not None:
        data = generate(str(source), seed=seed, **generator_kwargs)
        if split not in data:
            raise ValueError(f"generator {source!r} has no split {split!r}; available splits: {sorted(data)}.")
        rows = data[split]
    else:
        if generator_kwargs:
            raise TypeError(f"unexpected arguments {sorted(generator_kwargs)}: they only apply to "
                            "generator sources.")
        if not path.exists():
            study = Path(__file__).resolve().parents[3] / "shared" / "paper_datasets" / path.name
            hint = f" Did you mean {str(study)!r}?" if study.is_dir() else ""
            raise ValueError(f"no such file, folder or generator: {str(source)!r}.{hint} " + _source_kinds())
        mapping = {"prompt_column": prompt_column, "response_column": response_column,
                   "group_column": group_column}
        if path.is_dir():
            records, columns = _from_disk(path, split)
        else:
            records, kind = _read_file(path)
            records = _split_records(records, kind, split, str(path))
            columns = list(records[0]) if records else []
        rows = _to_rows(records, columns, str(path), split, mapping)
    if not rows:
        raise ValueError(f"{source!r}: split {split!r} has no rows.")
    return stratified_subsample(rows, limit, seed) if limit is not None else rows
