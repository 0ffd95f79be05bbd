"""The CUDA selective-scan kernel at both extremes the models produce, against the GPU's copy
bandwidth and the project's torch-on-GPU fallback, measured side by side in one run.

- long:  a whole scene flattened, batch 1, dim 256, L = 200,000, N = 16 (MambaHSI's spatial scan)
- short: L = 4, 10^7 sequences x channels (batch 156,250 x dim 64), N = 16 (spectral tokens)

For each: kernel time (median of --runs, CUDA events), the bytes it must move (u, delta, z,
B, C read once, y written once), the bandwidth that implies, that bandwidth as a share of a
device-to-device copy measured in the same run, and the time of the `reference` backend
(the sequential PyTorch loop on the GPU, the fallback when the kernel is not built).
Target: at least 60 % of the copy bandwidth at both extremes, faster than the fallback.
A benchmark, not a test: it prints a table and asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
from rich.console import Console
from rich.table import Table

from hsiedge.ops import cuda, scan_backend, selective_scan

SHAPES = {"long (scene flattened)": (1, 256, 200_000), "short (L = 4)": (156_250, 64, 4)}
N = 16


def timed(fn, runs: int) -> float:
    """Median milliseconds of fn() over `runs` runs, after one warm-up."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth(runs: int, nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + bytes written)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src), runs)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def measure(batch: int, dim: int, L: int, dtype: torch.dtype, copy: float, runs: int,
            fallback_runs: int) -> list[str]:
    """One table row: the kernel and the torch fallback on fresh random inputs of one shape."""
    g = torch.Generator(device="cuda").manual_seed(0)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device="cuda").to(dtype)

    u, delta, z = r(batch, dim, L), r(batch, dim, L) * 0.5 - 1, r(batch, dim, L)
    B, C = r(batch, N, L), r(batch, N, L)
    A = -torch.rand(dim, N, generator=g, device="cuda")
    D, bias = torch.randn(dim, device="cuda"), torch.zeros(dim, device="cuda")
    out = torch.empty_like(u)
    ms = timed(lambda: cuda.run(u, delta, A, B, C, D, z, bias, True, out=out), runs)
    moved = (4 * batch * dim * L + 2 * batch * N * L) * (torch.finfo(dtype).bits // 8)
    gbs = moved / (ms * 1e-3) / 1e9
    with scan_backend("reference"):
        fb = timed(lambda: selective_scan(u, delta, A, B, C, D, z, bias, True), fallback_runs)
    return [f"{batch:,} x {dim} x {L:,}", f"{ms:.3f}", f"{moved / 1e6:,.0f}", f"{gbs:,.0f}",
            f"{100 * gbs / copy:.0f} %", f"{fb:,.1f}", f"{fb / ms:,.0f}x"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    ap.add_argument("--fallback-runs", type=int, default=1, help="runs of the slow torch fallback")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/scan_gpu.py needs a CUDA GPU; PyTorch sees none here")
    cuda.load()
    console = Console(width=160)
    dtype = getattr(torch, args.dtype)
    copy = copy_bandwidth(args.runs)
    table = Table(title=f"selective scan on {torch.cuda.get_device_name()} ({args.dtype}, N = {N}); "
                        f"device-to-device copy: {copy:,.0f} GB/s")
    for col in ("extreme", "batch x dim x L", "kernel ms", "MB moved", "GB/s", "% of copy", "fallback ms",
                "speed-up"):
        table.add_column(col, justify="left" if col == "extreme" else "right")
    for name, (batch, dim, L) in SHAPES.items():
        table.add_row(name, *measure(batch, dim, L, dtype, copy, args.runs, args.fallback_runs))
        torch.cuda.empty_cache()
    console.print(table)


if __name__ == "__main__":
    main()
