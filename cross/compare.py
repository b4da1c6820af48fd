"""Compares what two builds of edgesight wrote (used by cross/check.sh).

  compare.py bundles DIR_A DIR_B     two bundles' manifests: file checksums, labels, k, …
  compare.py rows A.jsonl B.jsonl T  `classify --json` rows: same inputs and frames, no
                                     errors, same top-1 labels, scores within T

Exits 1 with every difference listed when they do not agree.
"""

import json
import sys
import tomllib


# Manifest keys that must match besides the file checksums (`created` differs by design).
SAME_KEYS = ("input_size", "labels", "k", "explained_variance")


def manifest(bundle):
    with open(f"{bundle}/manifest.toml", "rb") as file:
        return tomllib.load(file)


def compare_bundles(a, b):
    manifest_a, manifest_b = manifest(a), manifest(b)
    files_a, files_b = manifest_a["files"], manifest_b["files"]
    problems = [
        f"{name}: {files_a.get(name)} vs {files_b.get(name)}"
        for name in sorted(set(files_a) | set(files_b))
        if files_a.get(name) != files_b.get(name)
    ]
    problems += [
        f"{key}: {manifest_a.get(key)!r} vs {manifest_b.get(key)!r}"
        for key in SAME_KEYS
        if manifest_a.get(key) != manifest_b.get(key)
    ]
    if problems:
        print("bundles differ:\n  " + "\n  ".join(problems))
        return 1
    print(f"bundles identical ({len(files_a)} files with the same sha256; same labels, k)")
    return 0


def read_rows(path):
    with open(path) as file:
        return [json.loads(line) for line in file if line.strip()]


def compare_rows(a, b, tolerance):
    rows_a, rows_b = read_rows(a), read_rows(b)
    problems = []
    if len(rows_a) != len(rows_b):
        problems.append(f"{len(rows_a)} rows vs {len(rows_b)}")
    worst = 0.0
    for row_a, row_b in zip(rows_a, rows_b):
        where = f"{row_a.get('file')} frame {row_a.get('frame')}"
        if "error" in row_a or "error" in row_b:
            problems.append(f"{where}: failed: {row_a.get('error') or row_b.get('error')}")
        for key in ("file", "frame", "time_ms", "label"):
            if row_a.get(key) != row_b.get(key):
                problems.append(f"{where}: {key} {row_a.get(key)!r} vs {row_b.get(key)!r}")
        if "score" in row_a and "score" in row_b:
            difference = abs(row_a["score"] - row_b["score"])
            worst = max(worst, difference)
            if difference > tolerance:
                problems.append(
                    f"{where}: score {row_a['score']} vs {row_b['score']} (off by {difference:.2e})"
                )
    if not rows_a:
        problems.append("no rows")
    if problems:
        print("classifications differ:\n  " + "\n  ".join(problems))
        return 1
    labelled = sum(1 for row in rows_a if "label" in row)
    print(
        f"{len(rows_a)} rows agree ({labelled} classified frames, same top-1 labels); "
        f"largest score difference {worst:.2e} (limit {tolerance:g})"
    )
    return 0


def main(argv):
    if len(argv) == 4 and argv[1] == "bundles":
        return compare_bundles(argv[2], argv[3])
    if len(argv) == 5 and argv[1] == "rows":
        return compare_rows(argv[2], argv[3], float(argv[4]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
