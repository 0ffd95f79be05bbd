"""The C selective-scan kernel built for aarch64 (Jetson Orin) and run under qemu-user, checked
against a float64 NumPy selective scan.  A script, not a test: it prints a table.

    python bench/aarch64_kernel.py [--seed S] [--threads 4] [--quick]

Needs an aarch64 cross compiler with its C library and qemu-user (Debian/Ubuntu:
`apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user`); without them it says
so in one sentence and exits with status 2.

What it does, per target:

- builds `hsiedge/ops/csrc/selective_scan_cpu.c` into a shared library the way
  `hsiedge.ops.cpu.compile_library` does (its compile flags, `-c` then `-shared -pthread ... -lm`
  without -ffast-math at link).  On a real aarch64 host cpu.py adds `-mcpu=native`; a cross
  compiler cannot detect a host CPU (it rejects `native`), so the aarch64 builds name the CPU
  instead: `-mcpu=cortex-a78ae` (Jetson Orin's core), `-march=armv8.2-a`, and none at all
  (the portable build cpu.py falls back to when the compiler takes no native flag);
- builds a small C driver (below) that dlopen()s the library (RTLD_NOW, as ctypes does, so a
  missing symbol fails here too), reads the inputs from a binary file, calls
  `hsiedge_selective_scan_f32` / `hsiedge_selective_scan_bwd_f32` with the argument order and
  NULLs of cpu.py's `scan_numpy` / `scan_numpy_backward`, and writes the outputs;
- runs the aarch64 driver under `qemu-aarch64 -L /usr/aarch64-linux-gnu`, and, as a control,
  the same driver built natively with `compile_library` itself (this host's -march=native);
- compares y and every gradient with a float64 reference written here (a plain recurrence and
  its hand-derived reverse pass; the reverse pass is first checked against central finite
  differences of the forward), on fresh random inputs (the seed is printed; --seed repeats it).

Errors: "abs" is max |got - ref|; "rel" is max |got - ref| / max |ref| (the tests' measure),
for y and, for the gradients, the worst over du, ddelta, dA, dB, dC, dD, dz, ddelta_bias.
Pass: y rel <= 1e-5 and gradient rel <= 1e-4, the tolerances of tests/test_selective_scan.py.
Times under qemu say nothing about a Jetson, so none are shown.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hsiedge.ops import cpu

SYSROOT = Path("/usr/aarch64-linux-gnu")
CROSS_CC = "aarch64-linux-gnu-gcc"
AARCH64_TARGETS = {"cortex-a78ae": ["-mcpu=cortex-a78ae"], "armv8.2-a": ["-march=armv8.2-a"],
                   "armv8-a (portable)": []}
Y_TOL, GRAD_TOL = 1e-5, 1e-4

DRIVER = r"""
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

typedef int (*fwd_fn)(const float *, const float *, const float *, const float *, const float *,
                      const float *, const float *, const float *, float *,
                      int64_t, int64_t, int64_t, int64_t, int64_t, int, int);
typedef int (*bwd_fn)(const float *, const float *, const float *, const float *, const float *,
                      const float *, const float *, const float *, const float *,
                      float *, float *, float *, float *, float *, float *, float *, float *,
                      int64_t, int64_t, int64_t, int64_t, int64_t, int, int);

static FILE *in, *out;

static float *get(int64_t n, int present)
{
    if (!present) return NULL;
    float *p = (float *)malloc(sizeof(float) * (size_t)(n ? n : 1));
    if (!p || fread(p, sizeof(float), (size_t)n, in) != (size_t)n) exit(3);
    return p;
}

static float *fresh(int64_t n, int present)
{
    if (!present) return NULL;
    float *p = (float *)malloc(sizeof(float) * (size_t)(n ? n : 1));
    if (!p) exit(3);
    for (int64_t i = 0; i < n; ++i) p[i] = -12345.0f; /* every output must be written */
    return p;
}

static void put(const float *p, int64_t n)
{
    if (p && fwrite(p, sizeof(float), (size_t)n, out) != (size_t)n) exit(5);
}

/* driver LIB IN OUT.  IN: int64 batch, dim, L, N, groups, softplus, has_D, has_z, has_bias,
 * mode (0 forward, 1 backward), threads; then float32 u, delta, A, B, C, [D], [z], [bias],
 * [gout if mode 1].  OUT: int32 return code, int32 lane entry points present (AVX-512
 * build), then y, or du, ddelta, dA, dB, dC, [dD], [dz], [dbias]. */
int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: driver LIB IN OUT\n");
        return 2;
    }
    void *lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        fprintf(stderr, "dlopen: %s\n", dlerror());
        return 4;
    }
    fwd_fn fwd = (fwd_fn)dlsym(lib, "hsiedge_selective_scan_f32");
    bwd_fn bwd = (bwd_fn)dlsym(lib, "hsiedge_selective_scan_bwd_f32");
    const int32_t lanes = dlsym(lib, "hsiedge_lane_exp_f32") != NULL;
    if (!fwd || !bwd) {
        fprintf(stderr, "missing entry point\n");
        return 4;
    }
    in = fopen(argv[2], "rb");
    int64_t h[11];
    if (!in || fread(h, sizeof(int64_t), 11, in) != 11) return 3;
    const int64_t batch = h[0], dim = h[1], L = h[2], N = h[3], G = h[4];
    const int softplus = (int)h[5], hasD = (int)h[6], hasz = (int)h[7], hasb = (int)h[8];
    const int mode = (int)h[9], threads = (int)h[10];
    const int64_t nx = batch * dim * L, nbc = batch * G * N * L;
    float *u = get(nx, 1), *delta = get(nx, 1), *A = get(dim * N, 1), *B = get(nbc, 1);
    float *C = get(nbc, 1), *D = get(dim, hasD), *z = get(nx, hasz), *bias = get(dim, hasb);
    float *gout = get(nx, mode == 1);
    fclose(in);
    out = fopen(argv[3], "wb");
    if (!out) return 5;
    int32_t rc;
    if (mode == 0) {
        float *y = fresh(nx, 1);
        rc = fwd(u, delta, A, B, C, D, z, bias, y, batch, dim, L, N, G, softplus, threads);
        fwrite(&rc, sizeof rc, 1, out);
        fwrite(&lanes, sizeof lanes, 1, out);
        put(y, nx);
    } else {
        float *du = fresh(nx, 1), *dd = fresh(nx, 1), *dA = fresh(dim * N, 1), *dB = fresh(nbc, 1);
        float *dC = fresh(nbc, 1), *dD = fresh(dim, hasD), *dz = fresh(nx, hasz);
        float *db = fresh(dim, hasb);
        rc = bwd(u, delta, A, B, C, D, z, bias, gout, du, dd, dA, dB, dC, dD, dz, db,
                 batch, dim, L, N, G, softplus, threads);
        fwrite(&rc, sizeof rc, 1, out);
        fwrite(&lanes, sizeof lanes, 1, out);
        put(du, nx); put(dd, nx); put(dA, dim * N); put(dB, nbc); put(dC, nbc);
        put(dD, dim); put(dz, nx); put(db, dim);
    }
    return fclose(out) == 0 ? 0 : 5;
}
"""


# ---------------------------------------------------------------- float64 reference (independent)

def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _expand(M, dim):
    """(batch, N, L) or (batch, G, N, L) -> (batch, dim, N, L), channel d reading group d // (dim/G)."""
    M = M[:, None] if M.ndim == 3 else M
    return np.repeat(M, dim // M.shape[1], axis=1)


def _dt(delta, bias, softplus):
    x = delta + (bias[:, None] if bias is not None else 0.0)
    return x, (np.logaddexp(0.0, x) if softplus else x)


def ref_forward(u, delta, A, B, C, D, z, bias, softplus, keep=False):
    """y of the selective scan, in float64; with keep, also the states h_t and y before the gate."""
    batch, dim, L = u.shape
    _, dt = _dt(delta, bias, softplus)
    Bx, Cx = _expand(B, dim), _expand(C, dim)
    h = np.zeros((batch, dim, A.shape[1]))
    hist = np.empty((L, *h.shape)) if keep else None
    p = np.empty_like(u)
    for t in range(L):
        h = np.exp(dt[..., t, None] * A) * h + (dt[..., t] * u[..., t])[..., None] * Bx[..., t]
        p[..., t] = (h * Cx[..., t]).sum(-1)
        if keep:
            hist[t] = h
    if D is not None:
        p = p + D[:, None] * u
    y = p * (z * _sigmoid(z)) if z is not None else p
    return (y, hist, p) if keep else y


def _group_sum(X, G):
    """(batch, dim, N, L) summed over the channels of each group -> (batch, G, N, L)."""
    b, dim, N, L = X.shape
    return X.reshape(b, G, dim // G, N, L).sum(2)


def ref_backward(u, delta, A, B, C, D, z, bias, softplus, g):
    """Gradients of sum(g * y) w.r.t. (u, delta, A, B, C, D, z, bias), reverse pass in float64."""
    batch, dim, L = u.shape
    grouped, G = B.ndim == 4, (B.shape[1] if B.ndim == 4 else 1)
    x, dt = _dt(delta, bias, softplus)
    Bx, Cx = _expand(B, dim), _expand(C, dim)
    _, hist, p = ref_forward(u, delta, A, B, C, D, z, bias, softplus, keep=True)
    if z is not None:
        s = _sigmoid(z)
        gp, dz = g * z * s, g * p * s * (1.0 + z * (1.0 - s))
    else:
        gp, dz = g, None
    du = gp * D[:, None] if D is not None else np.zeros_like(u)
    dD = (gp * u).sum((0, 2)) if D is not None else None
    ddt, dA = np.zeros_like(u), np.zeros_like(A)
    dBx, dCx = np.zeros_like(Bx), np.zeros_like(Cx)
    gh = np.zeros((batch, dim, A.shape[1]))
    for t in range(L - 1, -1, -1):
        a = np.exp(dt[..., t, None] * A)
        hprev = hist[t - 1] if t else np.zeros_like(gh)
        gh = gh + gp[..., t, None] * Cx[..., t]              # dLoss/dh_t
        dCx[..., t] = gp[..., t, None] * hist[t]
        dBx[..., t] = gh * (dt[..., t] * u[..., t])[..., None]
        du[..., t] += (gh * Bx[..., t]).sum(-1) * dt[..., t]
        ddt[..., t] = (gh * (A * a * hprev + u[..., t, None] * Bx[..., t])).sum(-1)
        dA += (gh * a * hprev * dt[..., t, None]).sum(0)
        gh = gh * a
    ddelta = ddt * _sigmoid(x) if softplus else ddt
    dbias = ddelta.sum((0, 2)) if bias is not None else None
    dB, dC = _group_sum(dBx, G), _group_sum(dCx, G)
    if not grouped:
        dB, dC = dB[:, 0], dC[:, 0]
    return du, ddelta, dA, dB, dC, dD, dz, dbias


def check_reference(rng) -> float:
    """Worst relative error of ref_backward against central differences of ref_forward."""
    case = Case(2, 4, 5, 3, 2, True, True, True, True)
    args = make_inputs(case, rng, np.float64)
    g = rng.standard_normal(args[0].shape)
    grads = ref_backward(*args, case.softplus, g)
    worst, eps = 0.0, 1e-6
    for i, grad in enumerate(grads):
        if grad is None:
            continue
        fd = np.zeros_like(grad)
        for idx in np.ndindex(grad.shape):
            plus, minus = list(args), list(args)
            plus[i], minus[i] = args[i].copy(), args[i].copy()
            plus[i][idx] += eps
            minus[i][idx] -= eps
            diff = ref_forward(*plus, case.softplus) - ref_forward(*minus, case.softplus)
            fd[idx] = (diff * g).sum() / (2 * eps)
        worst = max(worst, float(np.abs(grad - fd).max() / np.abs(fd).max()))
    return worst


# ---------------------------------------------------------------- cases

@dataclass(frozen=True)
class Case:
    batch: int
    dim: int
    L: int
    N: int
    G: int | None          # None: ungrouped B, C of (batch, N, L)
    z: bool
    D: bool
    bias: bool
    softplus: bool
    wide: bool = False     # wide input ranges: softplus's linear branch, exp underflow, large |z|

    def shape(self) -> str:
        g = f" G{self.G}" if self.G else ""
        return f"b{self.batch} d{self.dim} L{self.L} N{self.N}{g}"

    def options(self) -> str:
        on = [n for n in ("z", "D", "bias", "softplus") if getattr(self, n)]
        return (",".join(on) or "-") + (" wide" if self.wide else "")


CASES = [
    Case(1, 5, 7, 16, None, False, False, False, False),
    Case(3, 13, 4, 7, None, False, True, False, True),        # L = 4: spectral tokens
    Case(2, 37, 300, 16, None, True, True, True, True),       # > 2e5 work: threads, 2 time tiles
    Case(2, 24, 65, 33, 3, True, False, True, False),         # grouped, N > 32
    Case(1, 3, 1, 1, 1, True, True, True, True),              # grouped form with G = 1, L = 1, N = 1
    Case(1, 8, 2000, 16, None, False, True, True, True),      # long: 8 time tiles
    Case(2, 6, 20, 256, 2, True, True, False, True),          # N at its maximum
    Case(2, 19, 33, 16, None, True, True, True, True, wide=True),
]
QUICK_CASES = [CASES[0], CASES[1], CASES[2], CASES[3], CASES[7]]


def make_inputs(case: Case, rng, dtype=np.float32):
    b, d, L, N = case.batch, case.dim, case.L, case.N
    bc = (b, case.G, N, L) if case.G else (b, N, L)
    r = rng.standard_normal
    spread = 3.0 if case.wide else 1.0
    delta = (15.0 * r((b, d, L)) if case.wide else r((b, d, L))) if case.softplus \
        else 0.5 * rng.random((b, d, L))
    args = [r((b, d, L)), delta, -np.exp(0.5 * spread * r((d, N))), r(bc), r(bc),
            r(d) if case.D else None, (10.0 if case.wide else 1.0) * r((b, d, L)) if case.z else None,
            0.3 * rng.random(d) if case.bias else None]
    return [None if a is None else np.ascontiguousarray(a, dtype=dtype) for a in args]


# ---------------------------------------------------------------- builds and runs

def build_cross(arch: list[str], src: Path, driver_c: Path, out: Path) -> tuple[Path, Path]:
    """The kernel library and the driver for aarch64, with cpu.py's compile and link steps."""
    obj, lib, drv = out / "scan.o", out / "libscan.so", out / "driver"
    steps = [[CROSS_CC, *cpu._COMPILE_FLAGS, *arch, "-c", str(src), "-o", str(obj)],
             [CROSS_CC, "-shared", "-pthread", str(obj), "-o", str(lib), "-lm"],
             [CROSS_CC, "-O2", "-std=c11", "-Wall", str(driver_c), "-o", str(drv), "-ldl"]]
    for cmd in steps:
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0 or r.stderr.strip():
            raise SystemExit(f"{' '.join(cmd)}\n{r.stderr}")
    return lib, drv


def build_native(src: Path, driver_c: Path, out: Path) -> tuple[Path, Path]:
    """The control: the library from cpu.compile_library itself, the driver with the host cc."""
    lib, drv = out / "libscan.so", out / "driver"
    cpu.compile_library([src], lib)
    cc = os.environ.get("CC", "cc")
    r = subprocess.run([cc, "-O2", "-std=c11", "-Wall", str(driver_c), "-o", str(drv), "-ldl"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(r.stderr)
    return lib, drv


def run_case(prefix: list[str], lib: Path, drv: Path, case: Case, args, g, threads: int,
             tmp: Path) -> tuple[int, bool, list[np.ndarray | None]]:
    b, d, L, N, G = case.batch, case.dim, case.L, case.N, case.G or 1
    mode = 0 if g is None else 1
    header = np.array([b, d, L, N, G, case.softplus, case.D, case.z, case.bias, mode, threads],
                      dtype=np.int64)
    fin, fout = tmp / "in.bin", tmp / "out.bin"
    with open(fin, "wb") as f:
        f.write(header.tobytes())
        for a in [*args, g]:
            if a is not None:
                f.write(np.ascontiguousarray(a, dtype=np.float32).tobytes())
    r = subprocess.run([*prefix, str(drv), str(lib), str(fin), str(fout)], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"driver failed ({r.returncode}) on {case.shape()}: {r.stderr.strip()}")
    raw = fout.read_bytes()
    rc, lanes = np.frombuffer(raw[:8], dtype=np.int32)
    data = np.frombuffer(raw[8:], dtype=np.float32)
    u, _, A, B, _, D, z, bias = args
    shapes = [u.shape] if mode == 0 else \
        [u.shape, u.shape, A.shape, B.shape, B.shape, None if D is None else D.shape,
         None if z is None else z.shape, None if bias is None else bias.shape]
    outs, at = [], 0
    for s in shapes:
        if s is None:
            outs.append(None)
            continue
        n = int(np.prod(s))
        outs.append(data[at:at + n].reshape(s).astype(np.float64))
        at += n
    if at != data.size:
        raise SystemExit(f"driver wrote {data.size} floats, expected {at}")
    return int(rc), bool(lanes), outs


def errors(got, ref) -> tuple[float, float]:
    err = float(np.abs(got - ref).max())
    return err, err / max(float(np.abs(ref).max()), 1e-30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=None, help="repeat a run (default: fresh inputs)")
    ap.add_argument("--threads", type=int, default=4, help="n_threads passed to the kernel")
    ap.add_argument("--quick", action="store_true", help="fewer cases, the cortex-a78ae build only")
    a = ap.parse_args()

    qemu = shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")
    missing = [name for name, ok in ((CROSS_CC, shutil.which(CROSS_CC)), ("qemu-aarch64", qemu),
                                     (f"{SYSROOT}/lib/libc.so.6", (SYSROOT / "lib/libc.so.6").exists()))
               if not ok]
    if missing:
        print(f"cannot run: {', '.join(missing)} not found (apt-get install gcc-aarch64-linux-gnu "
              f"libc6-dev-arm64-cross qemu-user).", file=sys.stderr)
        raise SystemExit(2)

    from rich.console import Console
    from rich.table import Table

    console = Console(width=200)
    seed = a.seed if a.seed is not None else int(np.random.SeedSequence().entropy % 2**32)
    rng = np.random.default_rng(seed)
    worst_fd = check_reference(rng)
    console.print(f"seed {seed}; float64 reference backward vs central differences: "
                  f"worst rel error {worst_fd:.1e}")
    if worst_fd > 1e-6:
        raise SystemExit("the reference backward disagrees with finite differences; nothing checked")

    cross_ver = subprocess.run([CROSS_CC, "-dumpfullversion"], capture_output=True, text=True).stdout.strip()
    qemu_ver = subprocess.run([qemu, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    targets = dict(list(AARCH64_TARGETS.items())[:1]) if a.quick else AARCH64_TARGETS
    cases = QUICK_CASES if a.quick else CASES
    inputs = []
    for case in cases:
        args = make_inputs(case, rng)
        g = rng.standard_normal(args[0].shape).astype(np.float32)
        wide = [None if x is None else x.astype(np.float64) for x in args]
        inputs.append((args, g, ref_forward(*wide, case.softplus),
                       ref_backward(*wide, case.softplus, g.astype(np.float64))))

    table = Table(title=f"CPU selective-scan kernel: aarch64 under {qemu_ver} (-L {SYSROOT}), "
                        f"and this host ({platform.machine()}) as the control")
    for col in ("build", "shape", "options", "n_threads", "lane", "y max abs", "y rel", "grad max abs",
                "grad rel (worst)", "result"):
        table.add_column(col, justify="left" if col in ("build", "shape", "options", "result") else "right")
    names = ("du", "ddelta", "dA", "dB", "dC", "dD", "dz", "dbias")
    failed = 0
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        driver_c = tmp / "driver.c"
        driver_c.write_text(DRIVER)
        builds = []
        for label, arch in targets.items():
            out = tmp / f"a64-{len(builds)}"
            out.mkdir()
            lib, drv = build_cross(arch, cpu.SOURCE, driver_c, out)
            builds.append((f"aarch64 {label}", [qemu, "-L", str(SYSROOT)], lib, drv))
            console.print(f"aarch64 {label}: {CROSS_CC} {cross_ver} "
                          f"{' '.join([*cpu._COMPILE_FLAGS, *arch])} (cross: -mcpu=native is not "
                          f"available), linked -shared -pthread -lm")
        out = tmp / "native"
        out.mkdir()
        lib, drv = build_native(cpu.SOURCE, driver_c, out)
        builds.append((f"{platform.machine()} native (control)", [], lib, drv))
        console.print(f"control: cpu.compile_library on this host ({os.environ.get('CC', 'cc')}, "
                      f"first of {[f[0] for f in cpu._NATIVE_FLAGS]} it accepts)")

        for label, prefix, lib, drv in builds:
            for case, (args, g, y_ref, g_ref) in zip(cases, inputs, strict=True):
                threads = a.threads
                rc_f, lanes, (y,) = run_case(prefix, lib, drv, case, args, None, threads, tmp)
                rc_b, _, grads = run_case(prefix, lib, drv, case, args, g, threads, tmp)
                y_abs, y_rel = errors(y, y_ref) if rc_f == 0 else (np.inf, np.inf)
                g_abs, g_rel, g_name = 0.0, 0.0, "-"
                for name, got, ref in zip(names, grads, g_ref, strict=True):
                    if (got is None) != (ref is None):
                        raise SystemExit(f"{name}: present in one of kernel/reference only")
                    if got is None:
                        continue
                    e_abs, e_rel = errors(got, ref)
                    g_abs = max(g_abs, e_abs)
                    if e_rel >= g_rel:
                        g_rel, g_name = e_rel, name
                ok = rc_f == 0 and rc_b == 0 and y_rel <= Y_TOL and g_rel <= GRAD_TOL
                failed += not ok
                table.add_row(label, case.shape(), case.options(), str(threads), "yes" if lanes else "no",
                              f"{y_abs:.1e}", f"{y_rel:.1e}", f"{g_abs:.1e}", f"{g_rel:.1e} ({g_name})",
                              "pass" if ok else f"FAIL (rc {rc_f}/{rc_b})")
    console.print(table)
    console.print(f"rel = max|err| / max|ref|; pass: y rel <= {Y_TOL:g}, gradients rel <= {GRAD_TOL:g}; "
                  f"lane = the AVX-512 lane kernel is in the build")
    if failed:
        raise SystemExit(f"{failed} row(s) failed")


if __name__ == "__main__":
    main()
