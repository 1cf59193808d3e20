"""Where a stage spends its time: a summary of a py-spy profile (``pip install -e '.[profile]'``).

    py-spy record -r 20 -f raw -o /tmp/nightly.txt -- python benchmarks/bench_nightly.py --customers 1000000
    python benchmarks/profile_summary.py /tmp/nightly.txt train_and_score --depth 2

Prints, for the samples whose stack holds ``root`` (a function name, e.g. ``train_and_score``, ``ingest_all``,
``clean_and_merge``, ``validate_entity``, ``build_customer_features``): the share of time inclusive of each call
path up to ``--depth`` levels below it, and the share spent in each leaf function (where the CPU was).
Shares are of the samples under ``root``; seconds assume the sampling rate given with ``--rate``.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path


def frame_label(frame: str) -> str:
    """``name (path/to/file.py:123)`` -> ``name@file.py:123``."""
    name, _, where = frame.partition(" (")
    return f"{name}@{where.rstrip(')').rsplit('/', 1)[-1]}" if where else name


def summarise(lines: list[str], root: str, depth: int) -> tuple[int, Counter, Counter]:
    total, inclusive, leaves = 0, Counter(), Counter()
    for line in lines:
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        at = next((i for i, f in enumerate(frames) if f.split(" (")[0] == root), None)
        if at is None:
            continue
        samples = int(count)
        total += samples
        below = frames[at + 1:]
        for level in range(1, min(depth, len(below)) + 1):
            inclusive[" > ".join(frame_label(f) for f in below[:level])] += samples
        leaves[below[-1].split(" (")[0] if below else "(in root itself)"] += samples
    return total, inclusive, leaves


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profile", type=Path, help="py-spy output recorded with -f raw")
    parser.add_argument("root", help="function whose time is broken down")
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--rate", type=float, default=20.0, help="py-spy's -r (samples per second)")
    parser.add_argument("--min-share", type=float, default=0.01)
    args = parser.parse_args()
    total, inclusive, leaves = summarise(args.profile.read_text().splitlines(), args.root, args.depth)
    if not total:
        raise SystemExit(f"no sample of {args.profile} has {args.root!r} on its stack")
    print(f"{total} samples under {args.root} = {total / args.rate:.1f} s")
    for path, samples in inclusive.most_common():
        if samples / total >= args.min_share:
            print(f"{samples / total:6.1%}  {path}")
    print("--- leaf functions ---")
    for name, samples in leaves.most_common(15):
        print(f"{samples / total:6.1%}  {name}")


if __name__ == "__main__":
    main()
