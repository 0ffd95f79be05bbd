"""Scene readers and writers (read side of the pipeline)."""

from hsiedge.io.mat import SceneReadError, read_mat_cube

__all__ = ["SceneReadError", "read_mat_cube"]
