"""Selective scan on the CPU at the two extremes the models produce: time and peak extra memory.

    python bench/scan_cpu.py [--runs 5] [--ref-runs 3] [--quick]

- short: L = 4, batch*dim = 10^7 (SpeMamba's spectral tokens of every pixel of a scene)
- long:  L = 2*10^5, batch 1, dim 256, N 16 (SpaMamba over a whole scene flattened)

Each (backend, extreme) runs in a fresh subprocess so that its peak resident memory can be
read from the OS: "extra" is the growth of peak RSS during the calls, beyond the inputs and
with the library already loaded; the output itself is part of it, so it is shown too.
Times are medians over several calls.  The ratio is against the sequential reference,
measured in the same run.  Where the cpu backend runs a lane kernel (AVX-512 or AVX2), the
portable forward is measured beside it (`HSIEDGE_SCAN_PORTABLE=1`).  The last column is the
size of the (batch, dim, L, N) state history that a naive parallel scan would materialise.

Roofline.  The same run measures this machine's two bounds: copy bandwidth (a large NumPy
copy, bytes read + written per second) and SGEMM peak (torch.mm of large float32 matrices,
2 n^3 FLOPs).  For each extreme it counts

- bytes moved: the inputs read once (u, delta, z: batch*dim*L each; B, C: batch*G*N*L each;
  A: dim*N; D, delta_bias: dim each) plus the output y written once, 4 bytes a value;
- FLOPs per element per state: dt*A, exp, *h, dt*u*B (1: dt*u is per element), +, *C, + =
  7 with exp counted as 1 FLOP ("exp=1"), and 16 with exp counted as 10 FLOPs ("exp=10", about
  what a polynomial exp costs).  Per-element work (softplus, D*u, the silu gate) is not counted.

The bound is the roofline time max(bytes / bandwidth, FLOPs / peak); "% bound" is that time
over the measured median, so 100 % means running at the tighter of the two limits.  Both
FLOP counts are shown; "% bound exp=1" is the strict figure, "% bound exp=10" the one with
exp at its real cost.
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


FLOPS_EXP1, FLOPS_EXP10 = 7, 16  # per element per state; exp counted as 1 or as 10 FLOPs


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


def measure_bounds(repeats: int = 5) -> tuple[float, float]:
    """(copy bandwidth in GB/s, SGEMM peak in GFLOP/s) of this machine, medians of `repeats`."""
    import numpy as np
    import torch

    src = np.ones(64 * 2**20, dtype=np.float32)  # 256 MiB, far beyond the caches
    dst = np.empty_like(src)
    bw = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        bw.append(2 * src.nbytes / (time.perf_counter() - t0) / 1e9)
    n = 4096
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm up
    peak = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        peak.append(2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return statistics.median(bw), statistics.median(peak)


def traffic(shape: dict) -> tuple[float, float, float]:
    """(bytes moved, FLOPs with exp=1, FLOPs with exp=10) of one scan of `shape` (G = 1)."""
    b, d, L, N = shape["batch"], shape["dim"], shape["L"], shape["N"]
    values = 3 * b * d * L + 2 * b * N * L + d * N + 2 * d + b * d * L  # inputs + y
    return 4.0 * values, float(b * d * L * N * FLOPS_EXP1), float(b * d * L * N * FLOPS_EXP10)


PORTABLE = "cpu portable"  # the cpu backend built without its lane kernel (HSIEDGE_SCAN_PORTABLE=1)


def run_child(backend: str, name: str, shape: dict, runs: int, out_path: str) -> dict:
    env = {**os.environ, "HSIEDGE_SCAN_PORTABLE": "1"} if backend == PORTABLE else None
    cmd = [sys.executable, __file__, "--child", "cpu" if backend == PORTABLE else backend, name, str(runs),
           out_path, json.dumps(shape)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
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
    ap.add_argument("--bounds", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.bounds:
        print(json.dumps(measure_bounds()))
        return
    if a.child:
        backend, name, runs, out_path, shape = a.child
        child(backend, json.loads(shape), int(runs), out_path)
        return

    import numpy as np
    from rich.console import Console
    from rich.table import Table

    console = Console(width=240)
    # in a child of its own: the parent's resident memory at fork would count in the
    # children's peak RSS, and these buffers are large
    r = subprocess.run([sys.executable, __file__, "--bounds"], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"bench bounds child failed:\n{r.stderr}")
    bw, peak = json.loads(r.stdout.strip().splitlines()[-1])
    from hsiedge.ops import cpu

    kind = cpu.forward_kind()
    console.print(f"bounds measured now: copy bandwidth {bw:.1f} GB/s, SGEMM peak {peak:.1f} GFLOP/s; "
                  f"load average {os.getloadavg()[0]:.2f}; the cpu backend's forward: {kind}")
    backends = [("reference", a.ref_runs), ("cpu", a.runs)]
    if kind != "portable":
        backends.append((PORTABLE, a.runs))
    table = Table(title=f"selective scan on CPU — {platform.processor() or platform.machine()}, "
                        f"{os.cpu_count()} cores")
    for col in ("extreme", "shape (batch, dim, L, N)", "backend", "median s", "min s",
                "x reference", "peak extra MB", "of it output MB", "max rel diff", "naive history MB",
                "GB/s", "GFLOP/s exp=1", "% bound exp=1", "% bound exp=10"):
        left = col in ("extreme", "backend", "shape (batch, dim, L, N)")
        table.add_column(col, justify="left" if left else "right")
    with tempfile.TemporaryDirectory() as tmp:
        for name, shape in (QUICK if a.quick else EXTREMES).items():
            res = {}
            for backend, runs in backends:
                console.print(f"[dim]{name}: {backend} x{runs}...[/dim]")
                out = os.path.join(tmp, f"{name}-{backend}.npy")
                res[backend] = run_child(backend, name, shape, runs, out)
            nbytes, fl1, fl10 = traffic(shape)
            mem_s = nbytes / (bw * 1e9)
            bound1, bound10 = max(mem_s, fl1 / (peak * 1e9)), max(mem_s, fl10 / (peak * 1e9))
            console.print(f"{name}: {nbytes / 1e6:.0f} MB moved (inputs read once + y written), "
                          f"{fl1 / 1e9:.2f} GFLOP at {FLOPS_EXP1}/element/state (exp=1), "
                          f"{fl10 / 1e9:.2f} GFLOP at {FLOPS_EXP10} (exp=10); roofline "
                          f"{bound1 * 1e3:.1f} ms (exp=1, "
                          f"{'compute' if bound1 > mem_s else 'memory'} bound), "
                          f"{bound10 * 1e3:.1f} ms (exp=10)")
            ref = np.load(os.path.join(tmp, f"{name}-reference.npy"))
            scale = float(np.abs(ref).max())
            ref_med = statistics.median(res["reference"]["times"])
            for backend, r in res.items():
                y = np.load(os.path.join(tmp, f"{name}-{backend}.npy"))
                med = statistics.median(r["times"])
                label = f"cpu, {kind}" if backend == "cpu" else backend
                table.add_row(name, str(tuple(shape.values())), f"{label} ({r['threads']} thr)",
                              f"{med:.3f}", f"{min(r['times']):.3f}", f"{ref_med / med:.1f}",
                              f"{r['extra_mb']:.0f}", f"{r['out_mb']:.0f}",
                              f"{float(np.abs(y - ref).max()) / scale:.1e}",
                              f"{np.prod(list(shape.values())) * 4 / 2**20:.0f}",
                              f"{nbytes / med / 1e9:.1f}", f"{fl1 / med / 1e9:.1f}",
                              f"{100 * bound1 / med:.1f}", f"{100 * bound10 / med:.1f}")
    console.print(table)


if __name__ == "__main__":
    main()
