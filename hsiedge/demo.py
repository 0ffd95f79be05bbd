"""`make demo`: the main job on a real scene, end to end.

Default scene: Jasper Ridge (AVIRIS, 100 x 100 x 198) from ../shared/datasets.  Part 1
classifies the whole scene with every seed model (freshly initialised) to show the forward
path and its throughput.  Part 2 is what a user does: train SpectralMamba briefly, export
it to fp32 / fp16 / int8 bundles (plugin-mode and portable ONNX), show each bundle's parity
against the PyTorch original on the held-out pixels, and build each bundle's TensorRT for
RTX engine (ahead of time, on this machine; plugin bundles where a plugin library is at hand).
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
from hsiedge.tensor_inputs import image_logits
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
                logits = image_logits(model, x[0]).permute(1, 2, 0).reshape(-1, n_cls)
            else:
                patches = torch.from_numpy(pixel_patches(x.numpy(), patch))
                logits = _batched(model, patches, 128)  # cache-sized batches
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
    console = Console(width=190)
    if not scene.is_file():
        console.print(f"[red]demo: scene {scene} not found; pass a .mat cube path[/red]")
        return 1
    console.print(f"selective-scan backends on CPU: {', '.join(available_backends('cpu'))}")
    console.print(run(scene.resolve()))
    labels = scene.with_name("_EndJasperRidge2_R198.mat")
    if scene.resolve() == DEFAULT_SCENE.resolve() and labels.is_file():
        console.print(export_and_check(scene.resolve(), labels))
    return 0


def export_and_check(scene: Path, labels: Path, epochs: int = 20) -> Table:
    """Train SpectralMamba for a few epochs, export three bundles, tabulate their parity."""
    import tempfile

    from hsiedge.checkpoint import save_checkpoint
    from hsiedge.export.bundle_export import export_bundle
    from hsiedge.io import read_labels
    from hsiedge.train import train_model

    cube = read_cube(scene)
    lm = read_labels(labels, shape=cube.shape[:2])
    table = Table(title=f"hsiedge export + parity + engine: SpectralMamba trained {epochs} epochs on "
                  f"{scene.name}, checked on its test split (ONNX Runtime CPU vs PyTorch)")
    for col in ("bundle", "rel L2", "max |Δ|", "label agreement", "OA original → bundle", "verdict",
                "TensorRT for RTX engine"):
        table.add_column(col, justify="left" if col in ("bundle", "verdict") else "right")
    with tempfile.TemporaryDirectory(prefix="hsiedge-demo-") as tmp:
        res = train_model("spectralmamba", cube, lm.labels, epochs=epochs, class_names=lm.class_names)
        res.checkpoint.train_info.update({"scene": str(scene), "scene_key": None})
        ckpt = save_checkpoint(Path(tmp) / "spectralmamba.pt", res.checkpoint)
        for scan in ("plugin", "portable"):
            for precision in ("fp32", "fp16", "int8"):
                out = Path(tmp) / f"bundle-{scan}-{precision}"
                m = export_bundle(ckpt, out, scan=scan, precision=precision, force=True)
                r = m["parity"]["results"][0]
                f = r["figures"]
                table.add_row(f"{precision}, scan {scan}", f"{f['rel_l2']:.2e}", f"{f['max_abs_error']:.2e}",
                              f"{100 * f['agreement']:.2f} %",
                              f"{100 * f['oa_original']:.2f} → {100 * f['oa_artifact']:.2f} %",
                              "pass" if r["passed"] else "FAIL: " + "; ".join(r["failures"]), _engine(out))
    return table


def _engine(bundle: Path) -> str:
    """Build the bundle's TensorRT for RTX engine; what happened, in a few words."""
    from hsiedge.bundle import open_bundle
    from hsiedge.export.bundle_engine import add_engine
    from hsiedge.export.engine import EngineBuildError

    try:
        e = add_engine(bundle, target="rtx")
    except EngineBuildError as err:
        return "not built: " + ("needs the plugin library (hsiedge plugin build)" if "--plugins" in str(err)
                                else str(err)[:80])
    size = open_bundle(bundle).manifest["artifacts"]["engine-rtx"]["bytes"]
    return (f"{size / 1e6:.1f} MB in {e['build_seconds']:.1f} s, {e['library']} {e['version']}, "
            f"SM {' '.join(str(c) for c in e['compute_capabilities'])}")


if __name__ == "__main__":
    raise SystemExit(main())
