"""The fast Hadamard transform vs a dense matmul with the same matrix, in one run.

    python benchmarks/hadamard.py [--rows 2048] [--sizes 384,1024,4096,8192]

Prints the median time of each and the ratio dense/fast, and the largest difference.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from lowbit.ir.dialects.hadamard import hadamard_matrix, hadamard_transform


def median_time(fn, repeats: int = 15) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--sizes", default="384,1024,4096,8192")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{'n':>6s} {'fast ms':>9s} {'dense ms':>9s} {'dense/fast':>10s} {'max |diff|':>11s}")
    for n in (int(s) for s in args.sizes.split(",")):
        x = torch.randn(args.rows, n)
        h = (hadamard_matrix(n) / math.sqrt(n)).float().T.contiguous()
        fast = median_time(lambda: hadamard_transform(x))
        dense = median_time(lambda: x @ h)
        diff = (hadamard_transform(x) - x @ h).abs().max().item()
        print(f"{n:6d} {fast * 1e3:9.2f} {dense * 1e3:9.2f} {dense / fast:10.2f} {diff:11.1e}")


if __name__ == "__main__":
    main()
