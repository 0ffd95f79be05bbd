"""Accuracy of the three seed models on a real scene against an RBF-SVM, on identical splits.

    python bench/accuracy.py [--seeds 0 1 2] [--protocols per-class:30 ratio:0.05] [--quick]

Default scene: Jasper Ridge (AVIRIS, 100 x 100 x 198); labels = argmax of its reference
abundances (tree, water, dirt, road).  Every model is trained by `hsiedge.train.train_model`
with its recipe, on CPU; the SVM (scikit-learn, standardised spectra, C and gamma chosen by
3-fold cross-validation on the training + validation pixels) sees the very same split.
Also printed, to explain gaps: SpectralMamba's pixel-wise variant and MD2F-Mamba on 1 x 1
patches (the same networks and recipes without spatial context); MD2F-Mamba with its
centre-weighted pooling instead of the paper's average (`pooling="centre-weighted"`); the best OA any
1/4-resolution output upsampled like MambaHSI's can reach on these labels (free logits
fitted to the labels themselves); and how often a pixel's neighbours share its label.
Each run's checkpoint is saved, loaded back and must predict identically.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from hsiedge.checkpoint import load_checkpoint, save_checkpoint
from hsiedge.io import read_cube, read_labels
from hsiedge.metrics import accuracy_report
from hsiedge.splits import make_split
from hsiedge.train import predict_scene, train_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "jasper_ridge"
# Diagnostic variants: the same networks and recipes without spatial context.
VARIANTS = {"spectralmamba-pixel": ("spectralmamba", {"patch_size": 0}),
            "md2f-mamba-1x1": ("md2f-mamba", {"patch_size": 1}),
            "md2f-mamba-centre": ("md2f-mamba", {"pooling": "centre-weighted"})}


def svm_run(cube: np.ndarray, labels: np.ndarray, protocol: str, seed: int) -> dict:
    from sklearn.model_selection import GridSearchCV
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    t0 = time.perf_counter()
    split = make_split(labels, protocol, seed)
    x, y = cube.reshape(-1, cube.shape[-1]).astype(np.float64), labels.ravel().astype(np.int64) - 1
    fit_idx = np.concatenate([split.train, split.val])
    scaler = StandardScaler().fit(x[split.train])
    grid = GridSearchCV(SVC(kernel="rbf"), {"C": [1, 10, 100, 1000], "gamma": ["scale", 1e-3, 1e-2]}, cv=3)
    grid.fit(scaler.transform(x[fit_idx]), y[fit_idx])
    report = accuracy_report(y[split.test], grid.predict(scaler.transform(x[split.test])), int(labels.max()))
    report["train_seconds"] = time.perf_counter() - t0
    return report


def round_trip_ok(result, cube: np.ndarray, tmp: Path) -> bool:
    """train -> save -> load -> identical predictions on every pixel."""
    path = save_checkpoint(tmp / "ckpt.pt", result.checkpoint)
    before, after = predict_scene(result.checkpoint, cube), predict_scene(load_checkpoint(path), cube)
    return bool(np.array_equal(before, after))


def quarter_resolution_ceiling(labels: np.ndarray, steps: int = 1500) -> float:
    """Best OA of any (H/4, W/4) logit map upsampled bilinearly (align_corners=True) on `labels`."""
    y = torch.from_numpy(labels.astype(np.int64) - 1)
    k, (h, w) = int(labels.max()), labels.shape
    onehot = F.one_hot(y, k).permute(2, 0, 1).float()[None]
    logits = torch.nn.Parameter(torch.log(F.avg_pool2d(onehot, 4) + 1e-3))
    opt = torch.optim.Adam([logits], lr=0.05)
    for _ in range(steps):
        up = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=True)[0].flatten(1).T
        loss = F.cross_entropy(5 * up, y.ravel())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float((up.argmax(1) == y.ravel()).float().mean())


def neighbour_purity(labels: np.ndarray, patch: int) -> float:
    r, (h, w) = patch // 2, labels.shape
    padded = np.pad(labels, r, mode="reflect")
    same = sum((padded[i:i + h, j:j + w] == labels).astype(float) for i in range(patch) for j in range(patch))
    return float((same / patch**2).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--protocols", nargs="+", default=["per-class:30", "ratio:0.05"])
    ap.add_argument("--models", nargs="+", default=["mambahsi", "spectralmamba", "md2f-mamba", *VARIANTS])
    ap.add_argument("--quick", action="store_true", help="5 epochs per model: a smoke run, not a result")
    a = ap.parse_args()
    console = Console(width=160)
    cube = read_cube(DATA / "JasperRidge2_R198.mat")
    lm = read_labels(DATA / "_EndJasperRidge2_R198.mat", shape=cube.shape[:2])
    console.print(f"Jasper Ridge {cube.shape}, classes {lm.class_names}, "
                  f"labelled {int((lm.labels > 0).sum())}; torch threads {torch.get_num_threads()}")

    rows: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for protocol in a.protocols:
            for seed in a.seeds:
                rows.setdefault(("svm-rbf", protocol), []).append(svm_run(cube, lm.labels, protocol, seed))
                for name in a.models:
                    model, cfg = VARIANTS.get(name, (name, {}))
                    console.print(f"[dim]{protocol} seed {seed}: {name}...[/dim]")
                    res = train_model(model, cube, lm.labels, protocol=protocol, seed=seed,
                                      epochs=5 if a.quick else None, class_names=lm.class_names,
                                      model_config=cfg)
                    rep = dict(res.report, round_trip=round_trip_ok(res, cube, Path(tmp)))
                    rows.setdefault((name, protocol), []).append(rep)

    table = Table(title="Jasper Ridge, test pixels: mean ± std over seeds " + " ".join(map(str, a.seeds)))
    for col in ("model", "protocol", "OA %", "AA %", "kappa", "train s", "vs SVM OA", "round trip"):
        table.add_column(col, justify="left" if col in ("model", "protocol") else "right")

    def ms(v: list[float], scale: float = 100.0) -> str:
        digits = 2 if scale == 100.0 else 4
        sd = statistics.pstdev(v) if len(v) > 1 else 0.0
        return f"{scale * statistics.mean(v):.{digits}f} ± {scale * sd:.{digits}f}"

    for protocol in a.protocols:
        svm_oa = statistics.mean(r["oa"] for r in rows[("svm-rbf", protocol)])
        for name in ["svm-rbf", *a.models]:
            rs = rows[(name, protocol)]
            oa = [r["oa"] for r in rs]
            kappa = ms([r["kappa"] for r in rs], 1.0)
            table.add_row(name, protocol, ms(oa), ms([r["aa"] for r in rs]), kappa,
                          f"{statistics.mean(r['train_seconds'] for r in rs):.1f}",
                          "" if name == "svm-rbf" else f"{100 * (statistics.mean(oa) - svm_oa):+.2f}",
                          "" if name == "svm-rbf" else ("identical" if all(r["round_trip"] for r in rs)
                                                        else "DIFFERS"))
    console.print(table)
    console.print(f"Best OA any 1/4-resolution map (MambaHSI's output) can reach on these labels: "
                  f"{100 * quarter_resolution_ceiling(lm.labels):.2f} %")
    console.print("Share of a pixel's neighbours with its own label: " + ", ".join(
        f"{p}x{p}: {100 * neighbour_purity(lm.labels, p):.1f} %" for p in (3, 7, 13)))


if __name__ == "__main__":
    main()
