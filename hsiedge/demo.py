"""`make demo`: build each seed model and classify a whole real scene with it.

Default scene: Jasper Ridge (AVIRIS, 100 x 100 x 198) from ../shared/datasets.  The models
are freshly initialised (training arrives with `hsiedge train`), so the class maps are not
meaningful yet; what the demo shows is the full forward path on real data: reading,
preprocessing, every model's forward through the compiled selective scan, and throughput.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from hsiedge.io import read_cube
from hsiedge.models import build_model, count_parameters
from hsiedge.ops import available_backends
from hsiedge.preprocess import PCA, Chain, Standardize
from hsiedge.tiling import pixel_patches

DEFAULT_SCENE = (Path(__file__).resolve().parents[2] / "shared" / "datasets" / "jasper_ridge"
                 / "JasperRidge2_R198.mat")
JASPER_CLASSES = ("tree", "water", "soil", "road")


def _batched(model: torch.nn.Module, x: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([model(x[i:i + batch]) for i in range(0, x.shape[0], batch)])


def run(scene: Path) -> Table:
    """Classify `scene` with each seed model; return a table of what happened."""
    cube = read_cube(scene).astype(np.float32)
    h, w, bands = cube.shape
    flat = cube.reshape(-1, bands)
    std_cube, _ = Chain([Standardize()]).fit(flat).apply(cube)
    image = torch.from_numpy(std_cube).permute(2, 0, 1).contiguous()  # (bands, H, W)
    pca_cube, _ = Chain([Standardize(), PCA(30)]).fit(flat, flat).apply(cube)
    pca_image = torch.from_numpy(pca_cube).permute(2, 0, 1)
    n_cls = len(JASPER_CLASSES)

    table = Table(title=f"hsiedge demo: {scene.name} ({h} x {w} x {bands}), untrained weights")
    for col in ("model", "params", "input", "output", "seconds", "pixels/s", "class histogram"):
        table.add_column(col, justify="right" if col in ("params", "seconds", "pixels/s") else "left")
    torch.manual_seed(0)
    runs = [
        ("mambahsi", {"in_channels": bands}, image.unsqueeze(0), None),
        ("spectralmamba", {"in_channels": bands}, image, 7),
        ("md2f-mamba", {"in_channels": 30}, pca_image, 13),
    ]
    for name, cfg, x, patch in runs:
        model = build_model(name, num_classes=n_cls, **cfg).eval()
        t0 = time.perf_counter()
        with torch.inference_mode():
            if patch is None:
                logits = model.full_resolution_logits(x)[0].permute(1, 2, 0).reshape(-1, n_cls)
            else:
                logits = _batched(model, pixel_patches(x, patch), 128)  # cache-sized batches
        dt = time.perf_counter() - t0
        labels = logits.argmax(1).numpy()
        hist = np.bincount(labels, minlength=n_cls)
        shape_in = tuple(x.shape) if patch is None else (h * w, x.shape[0], patch, patch)
        counts = " ".join(f"{c}:{k}" for c, k in zip(JASPER_CLASSES, hist, strict=True))
        table.add_row(name, f"{count_parameters(model):,}", str(shape_in), str(tuple(logits.shape)),
                      f"{dt:.2f}", f"{h * w / dt:,.0f}", counts)
    return table


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    scene = Path(argv[0]) if argv else DEFAULT_SCENE
    console = Console(width=150)
    if not scene.is_file():
        console.print(f"[red]demo: scene {scene} not found; pass a .mat cube path[/red]")
        return 1
    console.print(f"selective-scan backends on CPU: {', '.join(available_backends('cpu'))}")
    console.print(run(scene.resolve()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
