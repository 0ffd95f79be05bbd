"""The scenes of an `infer-many` run: paths, globs, text lists and STAC ItemCollections -> files.

Lists and catalogues are untrusted input: they are size-capped, and a STAC asset whose href is
a URL is refused (hsiedge reads local or mounted files and downloads nothing).  Relative paths
in a list or a catalogue are relative to the folder of the file that names them.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from hsiedge.infer.run import default_output

MAX_LIST_BYTES = 64 * 2**20
LIST_SUFFIXES = (".txt", ".list")
STAC_SUFFIXES = (".json", ".geojson")
# STAC media types of rasters hsiedge reads, for catalogues whose data asset has no "data" role
RASTER_TYPES = ("image/tiff", "image/vnd.stac.geotiff", "application/x-hdf", "application/x-hdf5",
                "application/octet-stream")


class CatalogueError(ValueError):
    """A scene argument, list or catalogue cannot be used; the message says which and why."""


def _read_small(path: Path, what: str) -> str:
    try:
        size = path.stat().st_size
        if size > MAX_LIST_BYTES:
            raise CatalogueError(f"{path}: expected a {what} of at most {MAX_LIST_BYTES // 2**20} MiB, "
                                 f"found {size / 2**20:,.0f} MiB")
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CatalogueError(f"{path}: expected a {what} in UTF-8 text, found binary data") from None
    except OSError as e:
        raise CatalogueError(f"{path}: cannot read the {what} ({e.strerror or e})") from None


def _text_list(path: Path) -> list[Path]:
    """One scene per line; blank lines and `#` comments are skipped."""
    lines = (line.strip() for line in _read_small(path, "scene list").splitlines())
    return [path.parent / line for line in lines if line and not line.startswith("#")]


def _asset_href(item: dict[str, Any], asset: str | None, where: str) -> str:
    assets = item.get("assets")
    if not isinstance(assets, dict) or not assets:
        raise CatalogueError(f"{where}: expected an item with assets, found none")
    if asset is not None:
        if asset not in assets:
            raise CatalogueError(f"{where}: has no asset {asset!r} (it has: {', '.join(map(str, assets))})")
        chosen = assets[asset]
    else:
        def pick(test: Any) -> list[Any]:
            return [a for a in assets.values() if isinstance(a, dict) and test(a)]

        chosen_list = pick(lambda a: "data" in (a.get("roles") or [])) or \
            pick(lambda a: str(a.get("type", "")).split(";")[0].strip() in RASTER_TYPES)
        if len(chosen_list) != 1:
            raise CatalogueError(f"{where}: cannot tell which asset is the scene (assets: "
                                 f"{', '.join(map(str, assets))}); name it with --asset")
        chosen = chosen_list[0]
    href = chosen.get("href") if isinstance(chosen, dict) else None
    if not isinstance(href, str) or not href:
        raise CatalogueError(f"{where}: expected the asset to have an href, found {href!r}")
    return href


def _stac(path: Path, asset: str | None) -> list[Path]:
    """The data asset of each item of a STAC ItemCollection (or of one Item)."""
    try:
        doc = json.loads(_read_small(path, "STAC catalogue"))
    except ValueError as e:
        raise CatalogueError(f"{path}: expected a STAC ItemCollection (JSON), found invalid JSON "
                             f"({e})") from None
    if isinstance(doc, dict) and doc.get("type") == "Feature":
        items = [doc]
    elif isinstance(doc, dict) and doc.get("type") == "FeatureCollection" \
            and isinstance(doc.get("features"), list):
        items = doc["features"]
    else:
        raise CatalogueError(f"{path}: expected a STAC ItemCollection or Item (GeoJSON \"type\": "
                             "\"FeatureCollection\" or \"Feature\"), found something else")
    scenes = []
    for i, item in enumerate(items):
        where = f"{path}, item {item.get('id', i) if isinstance(item, dict) else i}"
        if not isinstance(item, dict):
            raise CatalogueError(f"{where}: expected a JSON object")
        href = _asset_href(item, asset, where)
        url = urlparse(href)
        if url.scheme == "file":
            href = unquote(url.path)
        elif url.scheme and len(url.scheme) > 1:  # one letter: a Windows drive, not a scheme
            raise CatalogueError(f"{where}: the asset is at {href}, a URL; infer-many reads local or mounted "
                                 "files only (download the scenes first)")
        scenes.append(path.parent / href)
    return scenes


def expand_scenes(arguments: list[str], asset: str | None = None) -> list[Path]:
    """Every scene the arguments name, in order, each once: a scene file, a glob (`*.tif`), a text
    list (`.txt`, `.list`) or a STAC ItemCollection (`.json`, `.geojson`)."""
    scenes: list[Path] = []
    for arg in arguments:
        if glob.has_magic(arg):
            found = sorted(Path(p) for p in glob.glob(arg))
            if not found:
                raise CatalogueError(f"{arg}: no file matches this pattern")
            scenes += found
        elif arg.lower().endswith(LIST_SUFFIXES):
            scenes += _text_list(Path(arg))
        elif arg.lower().endswith(STAC_SUFFIXES):
            scenes += _stac(Path(arg), asset)
        else:
            scenes.append(Path(arg))
    unique: dict[Path, Path] = {}
    for scene in scenes:
        unique.setdefault(Path(scene).absolute(), scene)
    if not unique:
        raise CatalogueError("no scenes given: name scene files, a glob, a text list or a STAC "
                             "ItemCollection")
    return list(unique)


def outputs_for(scenes: list[Path], out_dir: Path) -> dict[Path, Path]:
    """Each scene's class map in `out_dir`, named as `infer` names it; two scenes that would
    write the same map are refused."""
    outputs: dict[Path, Path] = {}
    taken: dict[Path, Path] = {}
    for scene in scenes:
        out = out_dir / default_output(scene).name
        if out in taken:
            raise CatalogueError(f"{taken[out]} and {scene} would both be written to {out}; rename one, or "
                                 "run them with separate --out-dir")
        taken[out] = scene
        outputs[scene] = out
    return outputs
