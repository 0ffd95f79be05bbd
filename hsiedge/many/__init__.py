"""`hsiedge infer-many`: a catalogue of scenes on Dask (the `cluster` extra), one task per scene.

`catalogue` (scene arguments, lists and STAC ItemCollections -> files, output names), `worker`
(the bundle and runner a worker opens once; the per-scene task), `report` (the run report) and
`run` (`infer_many`: the client side).
"""
