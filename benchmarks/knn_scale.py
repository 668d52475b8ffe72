"""KNN at ImageNet-1K's size: the exact search KNN runs (every query against every bank row,
the bank read in blocks: `distance.kth_nearest_distances`, torch and faiss), timed on a
bank of synthetic ResNet-50-width features (2,048-d, 1,000 classes), projected to
ImageNet-1K's 1.28M-image bank and the queries of its test and OOD sets, next to an
approximate faiss index (IVF, inner product) with its recall@k against the exact search.

The cost of an exact search is linear in (queries x bank rows), so the projection scales
the measured seconds per (query x bank row). An IVF index visits about nprobe / nlist of
the bank per query; its recall@k is the fraction of the exact k nearest rows it returns.

    .venv/bin/python benchmarks/knn_scale.py [--quick] [--bank 200000] [--queries 2000]
        [--k 50] [--threads 1] [--nprobe 8,32]
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import time

import torch

from oodbench.postprocessors import distance

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
    start = time.perf_counter()
    result = work()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bank", type=int, default=200_000)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--nprobe", default="8,32")
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
    print(f"{'search':<28}{'seconds':>9}{'recall@k':>10}{'ImageNet-1K hours':>19}")
    backends = ["torch"] + (["faiss"] if importlib.util.find_spec("faiss") else [])
    exact = None
    for backend in backends:
        found, seconds = timed(lambda: distance.kth_nearest_distances(queries, bank, [args.k], backend))
        exact = found if exact is None else exact
        print(f"{'exact, ' + backend:<28}{seconds:>9.1f}{1.0:>10.3f}{seconds * scale / 3600:>19.1f}")
    if "faiss" not in backends:
        print("faiss is not installed: no approximate index (pip install 'oodbench[faiss]')")
        return
    import faiss

    faiss.omp_set_num_threads(args.threads)
    truth = faiss.knn(queries.numpy(), bank.numpy(), args.k, metric=faiss.METRIC_INNER_PRODUCT)[1]
    nlist = max(1, int(math.sqrt(args.bank)))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(DIM), DIM, nlist, faiss.METRIC_INNER_PRODUCT)
    chosen = torch.randperm(args.bank, generator=torch.Generator().manual_seed(3))
    sample = bank[chosen[:min(args.bank, 40 * nlist)]]  # k-means asks for 39 training rows per list
    _, build = timed(lambda: (index.train(sample.numpy()),
                              [index.add(block.numpy()) for block in bank.split(65536)]))  # added block by block
    # building scales with the bank, not with the queries
    build_hours = build * IMAGENET_BANK / args.bank / 3600
    for nprobe in (int(n) for n in args.nprobe.split(",")):
        index.nprobe = nprobe
        (_, ids), seconds = timed(lambda: index.search(queries.numpy(), args.k))
        recall = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ids, truth)) / truth.size
        print(f"{f'IVF{nlist} nprobe {nprobe}':<28}{seconds:>9.1f}{recall:>10.3f}"
              f"{seconds * scale / 3600 + build_hours:>19.2f}")
    print(f"(IVF build on {args.bank:,} rows: {build:.1f} s, included above as {build_hours:.2f} h at 1.28M; "
          "an IVF index holds the bank's vectors in memory: 10.5 GB at 1.28M x 2048 float32)")


if __name__ == "__main__":
    main()
