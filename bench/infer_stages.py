"""Where `hsiedge infer`'s time goes, stage by stage, for one bundle on one scene.

    python bench/infer_stages.py BUNDLE SCENE [--runtime R] [--tiles 6] [--batch 128]

Runs the first `--tiles` tiles of the scene through the same steps as the pipeline, one after
the other on this thread (the pipeline overlaps reading and writing with the runner on
threads of their own): the scene window read, the bundle's preprocessing, cutting the model
inputs (patches or the image tile), the runner calls, the argmax into class ids.  Prints the
seconds and share of each stage.  A benchmark: it prints a table and asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from hsiedge.bundle import open_bundle
from hsiedge.infer import DEFAULT_BATCH, Geometry
from hsiedge.io import open_scene
from hsiedge.runtimes import open_runner


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("scene", type=Path)
    ap.add_argument("--runtime", default=None)
    ap.add_argument("--tiles", type=int, default=6)
    ap.add_argument("--batch", type=int, default=DEFAULT_BATCH)
    a = ap.parse_args()
    bundle = open_bundle(a.bundle)
    seconds: dict[str, float] = defaultdict(float)
    pixels = 0
    with open_scene(a.scene) as scene, open_runner(bundle, a.runtime) as runner:
        geometry = Geometry.for_bundle(bundle, runtime=runner.name, scene_shape=(scene.height, scene.width))
        load = os.getloadavg()[0]
        for t in geometry.tiles(scene.height, scene.width)[:a.tiles]:
            t0 = time.perf_counter()
            raw = scene.read(t.read)
            t1 = time.perf_counter()
            x, _ = bundle.preprocessing.apply(raw, scene.nodata)
            image = torch.from_numpy(x).permute(2, 0, 1).contiguous()
            t2 = time.perf_counter()
            inputs = list(geometry.inputs(image, t, a.batch))
            t3 = time.perf_counter()
            outputs = [runner.run(b) for b in inputs]
            t4 = time.perf_counter()
            logits = geometry.logits(outputs, t)
            (logits.argmax(axis=0) + 1).astype(np.uint8)
            t5 = time.perf_counter()
            for name, d in (("read", t1 - t0), ("preprocess", t2 - t1), ("cut inputs", t3 - t2),
                            ("runner", t4 - t3), ("logits -> classes", t5 - t4)):
                seconds[name] += d
            pixels += t.core.height * t.core.width
    total = sum(seconds.values())
    table = Table(title=f"{bundle.model_name} ({bundle.precision}) on {a.scene.name}: {runner.name}, "
                        f"{a.tiles} tiles of {geometry.core} px core, {pixels:,} px, "
                        f"{pixels / total:,.0f} px/s serial; load average {load:.2f}")
    for col in ("stage", "seconds", "share"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for name, d in seconds.items():
        table.add_row(name, f"{d:.3f}", f"{100 * d / total:.1f} %")
    Console(width=150).print(table)


if __name__ == "__main__":
    main()
