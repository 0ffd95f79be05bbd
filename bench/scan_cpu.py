"""Selective scan on the CPU at the two extremes the models produce: time and peak extra memory.

    python bench/scan_cpu.py [--runs 5] [--ref-runs 3] [--quick]

- short: L = 4, batch*dim = 10^7 (SpeMamba's spectral tokens of every pixel of a scene)
- long:  L = 2*10^5, batch 1, dim 256, N 16 (SpaMamba over a whole scene flattened)

Each (backend, extreme) runs in a fresh subprocess so that its peak resident memory can be
read from the OS: "extra" is the growth of peak RSS during the calls, beyond the inputs and
with the library already loaded; the output itself is part of it, so it is shown too.
Times are medians over several calls.  The ratio is against the sequential reference,
measured in the same run.  The last column is the size of the (batch, dim, L, N) state
history that a naive parallel scan would materialise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

EXTREMES = {
    "short": dict(batch=156_250, dim=64, L=4, N=16),
    "long": dict(batch=1, dim=256, L=200_000, N=16),
}
QUICK = {"short": dict(batch=15_625, dim=64, L=4, N=16), "long": dict(batch=1, dim=256, L=20_000, N=16)}


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def child(backend: str, shape: dict, runs: int, out_path: str) -> None:
    import numpy as np
    import torch

    from hsiedge.ops import scan_backend, selective_scan

    g = torch.Generator().manual_seed(0)
    b, d, L, N = shape["batch"], shape["dim"], shape["L"], shape["N"]
    args = (torch.randn(b, d, L, generator=g), torch.randn(b, d, L, generator=g),
            -torch.exp(0.5 * torch.randn(d, N, generator=g)), torch.randn(b, N, L, generator=g),
            torch.randn(b, N, L, generator=g), torch.randn(d, generator=g),
            torch.randn(b, d, L, generator=g), torch.rand(d, generator=g))
    with scan_backend(backend):
        u, B = args[0][:1, :8, :3], args[3][:1, :, :3]
        selective_scan(u, u.abs(), args[2][:8], B, B, delta_softplus=True)  # load, warm up
        base = _maxrss_mb()
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            y = selective_scan(*args, delta_softplus=True)
            times.append(time.perf_counter() - t0)
            peak = _maxrss_mb()
            if len(times) == 1:
                np.save(out_path, y.numpy())
            del y
    print(json.dumps({"times": times, "extra_mb": peak - base,
                      "out_mb": b * d * L * 4 / 2**20, "threads": torch.get_num_threads()}))


def run_child(backend: str, name: str, shape: dict, runs: int, out_path: str) -> dict:
    cmd = [sys.executable, __file__, "--child", backend, name, str(runs), out_path, json.dumps(shape)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"bench child {backend}/{name} failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="timed calls of the fast backend")
    ap.add_argument("--ref-runs", type=int, default=3, help="timed calls of the reference")
    ap.add_argument("--quick", action="store_true", help="1/10 of the sizes (a smoke run)")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        backend, name, runs, out_path, shape = a.child
        child(backend, json.loads(shape), int(runs), out_path)
        return

    import numpy as np
    from rich.console import Console
    from rich.table import Table

    console = Console(width=170)
    table = Table(title=f"selective scan on CPU — {platform.processor() or platform.machine()}, "
                        f"{os.cpu_count()} cores")
    for col in ("extreme", "shape (batch, dim, L, N)", "backend", "median s", "min s",
                "x reference", "peak extra MB", "of it output MB", "max rel diff", "naive history MB"):
        left = col in ("extreme", "backend", "shape (batch, dim, L, N)")
        table.add_column(col, justify="left" if left else "right")
    with tempfile.TemporaryDirectory() as tmp:
        for name, shape in (QUICK if a.quick else EXTREMES).items():
            res = {}
            for backend, runs in (("reference", a.ref_runs), ("cpu", a.runs)):
                console.print(f"[dim]{name}: {backend} x{runs}...[/dim]")
                out = os.path.join(tmp, f"{name}-{backend}.npy")
                res[backend] = run_child(backend, name, shape, runs, out)
            ref = np.load(os.path.join(tmp, f"{name}-reference.npy"))
            scale = float(np.abs(ref).max())
            ref_med = statistics.median(res["reference"]["times"])
            for backend, r in res.items():
                y = np.load(os.path.join(tmp, f"{name}-{backend}.npy"))
                med = statistics.median(r["times"])
                table.add_row(name, str(tuple(shape.values())), f"{backend} ({r['threads']} thr)",
                              f"{med:.3f}", f"{min(r['times']):.3f}", f"{ref_med / med:.1f}",
                              f"{r['extra_mb']:.0f}", f"{r['out_mb']:.0f}",
                              f"{float(np.abs(y - ref).max()) / scale:.1e}",
                              f"{np.prod(list(shape.values())) * 4 / 2**20:.0f}")
    console.print(table)


if __name__ == "__main__":
    main()
