"""A PNG quick look of a class map with a legend, for people who would rather look than read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from hsiedge.atomic import atomic_path

MAX_SIDE = 1024
MIN_SIDE = 400


def write_quicklook(path: str | Path, classes: np.ndarray, classes_table: list[dict[str, Any]],
                    title: str = "") -> Path:
    """Class ids (0 nodata, drawn black), subsampled to at most 1024 px a side (small maps enlarged
    to about 400), with a title above and the legend on the right."""
    path = Path(path)
    step = max(1, -(-max(classes.shape) // MAX_SIDE))
    small = np.asarray(classes[::step, ::step])
    lut = np.zeros((max(c["id"] for c in classes_table) + 1, 3), np.uint8)
    for c in classes_table:
        lut[c["id"]] = c["colour"]
    rgb = Image.fromarray(lut[np.minimum(small, lut.shape[0] - 1)], "RGB")
    zoom = max(1, MIN_SIDE // max(rgb.size))  # small scenes are enlarged, pixels kept square
    rgb = rgb.resize((rgb.width * zoom, rgb.height * zoom), Image.NEAREST)
    font = ImageFont.load_default()
    row = 18
    title = title or path.stem
    legend_w = 16 + max(int(font.getlength(f"{c['id']} {c['name']}")) for c in classes_table) + 40
    height = max(rgb.height, row * (len(classes_table) + 2))
    width = max(rgb.width + legend_w, int(font.getlength(title)) + 8)
    canvas = Image.new("RGB", (width, height + row), "white")
    canvas.paste(rgb, (0, row))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 2), title, fill="black", font=font)
    x = rgb.width + 10
    for i, c in enumerate(classes_table):
        y = row * (i + 1) + 4
        draw.rectangle([x, y, x + 12, y + 12], fill=tuple(c["colour"]), outline="black")
        draw.text((x + 18, y), f"{c['id']} {c['name']}", fill="black", font=font)
    with atomic_path(path, ".partial.png") as tmp:
        canvas.save(tmp, format="PNG")
    return path
