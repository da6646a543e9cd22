"""Files of a resumable run: atomic writes and the settings guard every cached stage uses.

A stage's file is written to `<path>.tmp` and renamed over `<path>` (`os.replace` is atomic on POSIX), so an
interrupted run leaves either the old file or the new one, never half of one. A cached stage is valid only for
the settings that made it: `guard(path, settings)` records them beside the stage on first use and refuses any
later use with other settings, in one line that names each differing setting as (stored, new).
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import numpy as np


def _parent(path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)


def write_text(path: str, text: str) -> str:
    """Write `text` to `path` atomically (UTF-8); returns the path."""
    _parent(path)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def write_json(path: str, obj: Any, *, sort_keys: bool = False) -> str:
    """Write `obj` as indented JSON atomically (numpy scalars become floats); returns the path."""
    return write_text(path, json.dumps(obj, indent=1, default=float, sort_keys=sort_keys))


def write_npz(path: str, **arrays) -> str:
    """Write arrays to the .npz file `path` atomically; returns the path."""
    _parent(path)
    tmp = path + ".tmp.npz"  # np.savez appends .npz to names without it
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return path


def write_npy(path: str, array: np.ndarray) -> str:
    """Write one array to the .npy file `path` atomically; returns the path."""
    _parent(path)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)
    return path


def read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def load_npz(path: str) -> Optional[dict]:
    """The arrays of an .npz file as a dict (read whole, file closed), or None when it does not exist."""
    if not os.path.exists(path):
        return None
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def differences(stored: dict, settings: dict, *, absent_is_none: bool = False) -> dict:
    """{setting: (stored, new)} for every setting that differs. absent_is_none: compare only the keys of `settings`
    and read a key missing from `stored` as None (a setting added since, at its default, is no change)."""
    keys = settings if absent_is_none else set(stored) | set(settings)
    return {k: (stored.get(k), settings.get(k)) for k in sorted(keys) if stored.get(k) != settings.get(k)}


def guard(path: str, settings: dict, *, what: str, fix: str, absent_is_none: bool = False) -> None:
    """Record `settings` in the JSON file `path`, or, when it already holds other settings, raise ValueError
    "<folder> holds <what> made with other settings {name: (stored, new)}: <fix>". Settings are compared as JSON
    stores them (tuples as lists)."""
    settings = json.loads(json.dumps(settings, default=float))
    if os.path.exists(path):
        changed = differences(read_json(path), settings, absent_is_none=absent_is_none)
        if changed:
            raise ValueError(f"{os.path.dirname(path) or '.'} holds {what} made with other settings {changed} "
                             f"(stored, new): {fix}")
    else:
        write_json(path, settings, sort_keys=True)
