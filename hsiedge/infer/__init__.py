"""`hsiedge infer`: stream a scene of any size tile by tile through a bundle, to a class map.

One module per concern: `policy` (tile geometry and the memory budget), `pipeline` (the reader,
runner and writer threads), `staging` (memory-mapped results, the resume journal, the run lock)
and `run` (`infer_scene`: checks, outputs, and the order of it all).
"""

from hsiedge.infer.errors import InferError
from hsiedge.infer.policy import (
    DEFAULT_BATCH,
    DEFAULT_MEMORY_MIB,
    IMAGE_MEMORY,
    Geometry,
    image_tile_for_budget,
    tiled_logits,
)
from hsiedge.infer.run import check_scene, default_output, infer_scene

__all__ = ["DEFAULT_BATCH", "DEFAULT_MEMORY_MIB", "IMAGE_MEMORY", "Geometry", "InferError", "check_scene",
           "default_output", "image_tile_for_budget", "infer_scene", "tiled_logits"]
