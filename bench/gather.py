"""Cutting patches for a 128 x 128 tile: NumPy's window view against index tensors.

    python bench/gather.py [--rounds 5] [--batch 128]

For the patch geometries of the seed models (SpectralMamba: 7 x 7 patches of the scene's
bands, 103 for Pavia University; MD2F-Mamba: 13 x 13 patches of 30 PCA bands), times cutting
every core pixel's patch of one tile in `--batch`-pixel batches, with `hsiedge.tiling`'s
window-view gather (what `infer` uses on the CPU) and with its index-tensor gather (the
device / autograd path).  Minimum and median over interleaved rounds, single-threaded.
A benchmark: it prints a table and asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from hsiedge.tensor_inputs import gather_patches_indexed
from hsiedge.tiling import gather_patches

GEOMETRIES = {"spectralmamba (103 bands, 7 x 7)": (103, 7), "md2f-mamba (30 bands, 13 x 13)": (30, 13)}
CORE = 128


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=128)
    a = ap.parse_args()
    torch.set_num_threads(1)
    table = Table(title=f"patches of one {CORE} x {CORE} tile, {a.batch} per batch, 1 thread "
                        f"(load average {os.getloadavg()[0]:.2f} at start)")
    for col in ("geometry", "MB cut", "index tensors ms (min / median)", "window view ms (min / median)",
                "speed-up (medians)"):
        table.add_column(col, justify="left" if col == "geometry" else "right")
    for name, (bands, p) in GEOMETRIES.items():
        r = p // 2
        padded = torch.randn(bands, CORE + 2 * r, CORE + 2 * r)
        idx = torch.arange(CORE * CORE)
        rows, cols = idx // CORE, idx % CORE
        times: dict[str, list[float]] = {"index": [], "view": []}
        for _ in range(a.rounds):  # interleaved, so load changes hit both alike
            for key, fn, args in (("index", gather_patches_indexed, (padded, rows, cols)),
                                  ("view", gather_patches, (padded.numpy(), rows.numpy(), cols.numpy()))):
                image, r_all, c_all = args
                t0 = time.perf_counter()
                for i in range(0, CORE * CORE, a.batch):
                    fn(image, r_all[i:i + a.batch], c_all[i:i + a.batch], p)
                times[key].append((time.perf_counter() - t0) * 1e3)
        same = np.array_equal(gather_patches(padded.numpy(), rows[:999].numpy(), cols[:999].numpy(), p),
                              gather_patches_indexed(padded, rows[:999], cols[:999], p).numpy())
        if not same:
            raise SystemExit(f"{name}: the two gathers disagree")
        med = {k: statistics.median(v) for k, v in times.items()}
        table.add_row(name, f"{CORE * CORE * bands * p * p * 4 / 1e6:.0f}",
                      f"{min(times['index']):.0f} / {med['index']:.0f}",
                      f"{min(times['view']):.0f} / {med['view']:.0f}", f"{med['index'] / med['view']:.1f}x")
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
