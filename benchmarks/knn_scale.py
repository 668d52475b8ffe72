"""KNN at ImageNet-1K's size: the exact search KNN runs (every query against every bank row,
the bank read in blocks: `distance.kth_nearest_distances`, torch and faiss), timed on a
bank of synthetic ResNet-50-width features (2,048-d, 1,000 classes), projected to
ImageNet-1K's 1.28M-image bank and the queries of its test and OOD sets, next to KNN's
approximate ``index: ivf`` (`oodbench.postprocessors.approximate`: k-means lists, exact
similarities within the visited lists) with its recall@k against the exact search.

The cost of an exact search is linear in (queries x bank rows), so the projection scales
the measured seconds per (query x bank row). The ivf index visits nprobe of its sqrt(N)
lists per query, about nprobe x sqrt(N) rows, so its search time is projected with
queries x sqrt(bank rows), and its build (k-means on 39 sqrt(N) rows, then every row
against the sqrt(N) centroids) with bank rows^1.5, an upper bound. Its recall@k is the
fraction of the exact k nearest rows it returns (rows whose exact similarity reaches the
exact k-th one).

    .venv/bin/python benchmarks/knn_scale.py [--quick] [--bank 200000] [--queries 2000]
        [--k 50] [--threads 1] [--nprobe 4,8,32]
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import time

import torch

from oodbench.postprocessors import approximate, distance

IMAGENET_BANK = 1_281_167
# OpenOOD v1.5's ImageNet-1K test and OOD sets: ID test, SSB-hard, NINCO, iNaturalist,
# Textures, OpenImage-O, and the covariate-shifted ImageNet-V2, -R and -ES
IMAGENET_QUERIES = 45_000 + 49_000 + 5_879 + 10_000 + 5_160 + 15_869 + 10_000 + 30_000 + 64_000
DIM, CLASSES = 2048, 1000


def features(rows: int, seed: int) -> torch.Tensor:
    """Class-structured non-negative features (class centre + noise, ReLU), unit-normalised."""
    centres = torch.randn(CLASSES, DIM, generator=torch.Generator().manual_seed(0)).relu()
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (rows,), generator=gen)
    out = torch.empty(rows, DIM)
    for start in range(0, rows, 8192):
        block = labels[start:start + 8192]
        out[start:start + 8192] = (centres[block] + 0.8 * torch.randn(len(block), DIM, generator=gen)).relu()
    return torch.nn.functional.normalize(out, dim=1)


def timed(work):
    """`work()` and its CPU seconds (all threads; one by default): steady on a shared machine,
    where wall time counts the other jobs too."""
    start = time.process_time()
    result = work()
    return result, time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bank", type=int, default=200_000)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--nprobe", default="4,8,32", help="lists each query visits in the ivf index")
    parser.add_argument("--quick", action="store_true", help="a 20,000-row bank and 500 queries")
    args = parser.parse_args()
    if args.quick:
        args.bank, args.queries = 20_000, 500
    torch.set_num_threads(args.threads)
    bank, queries = features(args.bank, 1), features(args.queries, 2)
    pairs = args.queries * args.bank
    scale = IMAGENET_QUERIES * IMAGENET_BANK / pairs
    print(f"bank {args.bank:,} x {DIM}, {args.queries:,} queries, k={args.k}, {args.threads} thread(s); "
          f"ImageNet-1K: {IMAGENET_BANK:,} bank rows x {IMAGENET_QUERIES:,} queries")
    print(f"{'search':<28}{'CPU s':>9}{'recall@k':>10}{'ImageNet-1K hours':>19}")
    backends = ["torch"] + (["faiss"] if importlib.util.find_spec("faiss") else [])
    exact = None
    for backend in backends:
        found, seconds = timed(lambda: distance.kth_nearest_distances(queries, bank, [args.k], backend))
        exact = found if exact is None else exact
        print(f"{'exact, ' + backend:<28}{seconds:>9.1f}{1.0:>10.3f}{seconds * scale / 3600:>19.1f}")
    if "faiss" not in backends:
        print("faiss is not installed: no approximate index (pip install 'oodbench[faiss]')")
        return
    # KNN's index: ivf (`approximate`), built from the bank block by block as KNN's fit does
    ivf, build = timed(lambda: approximate.build_ivf(bank, lambda rows: rows, distance.BANK_ROWS))
    build_hours = build * (IMAGENET_BANK / args.bank) ** 1.5 / 3600  # the bank's rows against sqrt(N) centroids
    truth = exact_similarities(exact, args.k)
    for probes in (int(n) for n in args.nprobe.split(",")):
        approximate.IVF_PROBES = probes
        found, seconds = timed(lambda: approximate.ivf_best_similarities(queries, bank, ivf, args.k, lambda r: r))
        recall = (found >= truth[:, None]).sum().item() / found.numel()  # found rows among the exact k nearest
        # a query reads `probes` lists of about sqrt(N) rows each: its cost grows with sqrt(N)
        ivf_scale = IMAGENET_QUERIES / args.queries * math.sqrt(IMAGENET_BANK / args.bank)
        print(f"{f'ivf{len(ivf[0])}, {probes} lists visited':<28}{seconds:>9.1f}{recall:>10.3f}"
              f"{seconds * ivf_scale / 3600 + build_hours:>19.2f}")
    print(f"(ivf build on {args.bank:,} rows: {build:.1f} s, included above as {build_hours:.2f} h at 1.28M; "
          "it keeps the centroids and 8 bytes per bank row, no copy of the vectors)")


def exact_similarities(distances: torch.Tensor, k: int) -> torch.Tensor:
    """The exact k-th largest inner product of each query, from its k-th nearest distance
    (d = sqrt(2 - 2 s)), less a float32 rounding margin so that the k-th row itself counts."""
    return 1 - distances[:, 0].double() ** 2 / 2 - 1e-6


if __name__ == "__main__":
    main()
