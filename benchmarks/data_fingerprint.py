"""The cost of a data set's fingerprint (`FileState.describe`) with its content sample.

Times three calls on the files of a folder: without the sample (the stat-only naming of
before, for comparison), the first run on a root (the sample read and hashed, the state
cache empty) and a later run (the sample's hashes looked up by (path, size, mtime, inode)).
Either a real folder (``--folder``, e.g. ../shared/data/cifar10/test: 10,000 JPEGs), or a
synthetic one of ``--files`` files of ``--bytes`` bytes written under ``--scratch``. The
files are in the page cache when timed (the folder was just written or listed); a cold disk
adds its read time for the sampled files (1,000 files, or the whole small set).

    .venv/bin/python benchmarks/data_fingerprint.py --folder ../shared/data/cifar10/test
    .venv/bin/python benchmarks/data_fingerprint.py --files 100000 --bytes 2048 --scratch /tmp/fp100k
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from oodbench import identity


def synthetic(folder: Path, count: int, size: int) -> None:
    """`count` files of `size` distinct bytes in folders of 1,000 (ImageNet's layout)."""
    for index in range(count):
        sub = folder / f"c{index // 1000:04d}"
        if index % 1000 == 0:
            sub.mkdir(parents=True, exist_ok=True)
        (sub / f"{index:07d}.bin").write_bytes(index.to_bytes(8, "little") * (size // 8))


def timed(files: identity.FileState, paths: list[Path]) -> float:
    start = time.perf_counter()
    files.describe(paths)
    files.close()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, help="a real folder of files (else a synthetic one)")
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--bytes", type=int, default=2048)
    parser.add_argument("--scratch", type=Path, help="where the synthetic folder is written (removed after)")
    args = parser.parse_args()
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="fingerprint-"))
    folder = args.folder
    if folder is None:
        folder = scratch / "set"
        synthetic(folder, args.files, args.bytes)
    paths = sorted(Path(root) / name for root, _, names in os.walk(folder) for name in names)
    total = sum(path.stat().st_size for path in paths)
    state = scratch / "state"
    sampled = len(paths) > identity.SAMPLE_FILES and total > identity.WHOLE_SET_BYTES
    what = f"a seeded {identity.SAMPLE_FILES:,}" if sampled else "all"
    print(f"{len(paths):,} files, {total / 2**20:.1f} MiB; the sample: {what} of them")

    sampled_hash = identity.FileState._sampled_hash
    identity.FileState._sampled_hash = lambda self, state: ""  # no file read: the stat-only naming of before
    stat_only = timed(identity.FileState(folder.parent, state / "a"), paths)
    identity.FileState._sampled_hash = sampled_hash
    first = timed(identity.FileState(folder.parent, state / "b"), paths)
    later = timed(identity.FileState(folder.parent, state / "b"), paths)
    print(f"stat only (before): {stat_only:.2f} s; with the sample, first run on the root: {first:.2f} s "
          f"(+{first - stat_only:.2f} s); later runs: {later:.2f} s (+{later - stat_only:.2f} s)")
    shutil.rmtree(state)
    if args.folder is None and args.scratch is None:
        shutil.rmtree(scratch)


if __name__ == "__main__":
    main()
