"""Two feature stores byte for byte: every array (features, written, failed, ids) through zarr, and the
attributes that say what the store holds and how far it got. Used by test_slurm.py and, as a script,
by run_slurm_check.sh:

    python tests/integration/compare_stores.py ONE.zarr SHARDED.zarr     # exit 0: identical, 1: differ
"""

from __future__ import annotations

import sys
from pathlib import Path

# When the store was made, and what a run left about its own shards or lock files, may differ between
# one process and N shards; everything else must not.
VOLATILE_ATTRIBUTES = {"created", "shards"}


def differences(expected: str | Path, got: str | Path) -> list[str]:
    """What differs between the stores `expected` and `got` (empty: byte-identical arrays, same attributes)."""
    import numpy as np
    import zarr

    a, b = zarr.open_group(str(expected), mode="r"), zarr.open_group(str(got), mode="r")
    problems = []
    names_a, names_b = sorted(a.array_keys()), sorted(b.array_keys())
    if names_a != names_b:
        problems.append(f"arrays: {names_a} in {expected}, {names_b} in {got}")
    for name in sorted(set(names_a) & set(names_b)):
        x, y = a[name][...], b[name][...]
        if x.dtype != y.dtype or x.shape != y.shape:
            problems.append(f"{name}: {x.dtype}{list(x.shape)} in {expected}, {y.dtype}{list(y.shape)} in {got}")
        elif x.dtype.kind in "OUT":  # ids: strings, compared one by one
            if x.tolist() != y.tolist():
                problems.append(f"{name}: {sum(p != q for p, q in zip(x.tolist(), y.tolist()))} of {len(x)} differ")
        elif x.tobytes() != y.tobytes():
            rows = np.flatnonzero((x.view(np.uint8).reshape(len(x), -1) != y.view(np.uint8).reshape(len(y), -1))
                                  .any(axis=1))
            problems.append(f"{name}: {len(rows)} of {len(x)} rows differ in their bytes (first: row {rows[0]})")
    attrs_a, attrs_b = dict(a.attrs), dict(b.attrs)
    for key in sorted((set(attrs_a) | set(attrs_b)) - VOLATILE_ATTRIBUTES):
        if attrs_a.get(key) != attrs_b.get(key):
            problems.append(f"attribute {key}: {attrs_a.get(key)!r} in {expected}, {attrs_b.get(key)!r} in {got}")
    return problems


def summary(store: str | Path) -> str:
    """One line: rows, written, failed, complete."""
    import zarr

    g = zarr.open_group(str(store), mode="r")
    written, failed = g["written"][...], g["failed"][...]
    return (f"{store}: {len(written)} rows, {int(written.sum())} written, {int(failed.sum())} failed, "
            f"complete={g.attrs.get('complete')}")


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: compare_stores.py EXPECTED.zarr GOT.zarr", file=sys.stderr)
        return 2
    for store in argv:
        print(summary(store))
    problems = differences(*argv)
    for p in problems:
        print(f"DIFFERS: {p}")
    if not problems:
        print(f"identical: every array (features, written, failed, ids) byte for byte, and the attributes "
              f"(but {', '.join(sorted(VOLATILE_ATTRIBUTES))})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
