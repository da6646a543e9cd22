"""Print how a venv's installed versions differ from constraints.txt: .ci/run's drift step.

usage: python .ci/drift.py constraints.txt FREEZE_FILE
Lines 'name: pinned -> installed' for every package whose version moved, was added or was dropped.
"""

import re
import sys


def _pins(path):
    pins = {}
    for line in open(path, encoding="utf-8"):
        line = line.split("#", 1)[0].strip()
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==(\S+)", line)
        if match:
            pins[re.sub(r"[-_.]+", "-", match.group(1)).lower()] = match.group(2)
    return pins


def main(constraints, freeze):
    pinned, installed = _pins(constraints), _pins(freeze)
    moved = [(name, pinned.get(name, "(not pinned)"), installed.get(name, "(not installed)"))
             for name in sorted(set(pinned) | set(installed)) if pinned.get(name) != installed.get(name)]
    print(f"drift: {len(moved)} of {len(pinned)} pinned packages differ on the newest allowed versions")
    for name, old, new in moved:
        print(f"  {name}: {old} -> {new}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
