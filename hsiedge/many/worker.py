"""What runs on a Dask worker: the bundle and its runner, opened once, and one scene per task.

`BundleService` is a worker plugin: when a worker starts (a restarted one too) it verifies the
bundle (sha256 of every artifact, the signature where trusted keys are given, and that it is
the very manifest the client verified), opens the runner, and keeps both for every scene the
worker is given.  `classify` is the task: one scene through `infer_scene`, with `--resume`
always on, so a scene whose worker died continues from its staging journal (which only
continues a run identical in everything that defines it).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

from distributed import WorkerPlugin, get_worker

from hsiedge.bundle import Bundle, BundleError, open_bundle, sha256_file
from hsiedge.infer import InferError, infer_scene

PLUGIN_NAME = "hsiedge-bundle"


def output_files(entry: dict[str, Any]) -> list[str]:
    """The files a finished scene wrote: class map, probabilities, quick look, and the GeoTIFFs'
    `.aux.xml` sidecars (class names and colours)."""
    written = [p for p in (entry.get("output"), entry.get("probs"), entry.get("quicklook")) if p]
    return written + [f"{p}.aux.xml" for p in written if Path(f"{p}.aux.xml").is_file()]


def still_done(previous: dict[str, Any]) -> bool:
    """A scene a previous run finished, whose outputs and scene files are still, byte for byte,
    those it recorded (sha256); their mere existence proves nothing."""
    recorded = {**previous.get("outputs_sha256", {}), **previous.get("scene_files_sha256", {})}
    if previous.get("status") not in ("done", "skipped") or not previous.get("outputs_sha256"):
        return False
    try:
        return all(sha256_file(p) == digest for p, digest in recorded.items())
    except OSError:
        return False


class BundleService(WorkerPlugin):
    """A verified bundle and its open runner, for every scene of one worker."""

    name = PLUGIN_NAME

    def __init__(self, bundle: str, manifest_sha256: str, trusted_keys: list[str], runtime: str | None,
                 threads: int | None) -> None:
        self.bundle_path = bundle
        self.manifest_sha256 = manifest_sha256
        self.trusted_keys = trusted_keys
        self.runtime = runtime
        self.threads = threads

    def setup(self, worker: Any = None) -> None:
        """Verify and open now; a failure is kept, and each scene reports it."""
        from hsiedge.runtimes import RuntimeUnavailableError, open_runner

        self.lock = threading.Lock()  # one scene at a time: memory stays within one infer's
        self.bundle: Bundle | None = None
        self.runner = None
        self.error: str | None = None
        where = getattr(worker, "address", "this worker")
        try:
            bundle = open_bundle(self.bundle_path, self.trusted_keys)
            if bundle.manifest_sha256 != self.manifest_sha256:
                raise BundleError(f"{self.bundle_path}: on {where} the bundle's manifest differs from the "
                                  "one the client verified; every worker must see the same bundle")
            # every core this process may use unless told: Dask sets OMP_NUM_THREADS=1 in its workers
            threads = self.threads or len(os.sched_getaffinity(0))
            self.runner = open_runner(bundle, self.runtime, threads=threads)
            self.bundle = bundle
        except (BundleError, RuntimeUnavailableError) as e:
            self.error = str(e)

    def teardown(self, worker: Any = None) -> None:
        if self.runner is not None:
            self.runner.close()
            self.runner = None

    def classify(self, job: dict[str, Any]) -> dict[str, Any]:
        """One scene -> its report entry (done, skipped or failed; never raises for the scene's
        own faults, so one bad scene does not stop the others)."""
        entry: dict[str, Any] = {"scene": job["scene"], "output": job["output"],
                                 "worker": get_worker().address}
        with self.lock:
            t0 = time.perf_counter()
            previous = job.get("previous")
            if previous is not None and still_done(previous):
                keep = ("pixels", "seconds", "pixels_per_second", "outputs_sha256", "scene_files_sha256",
                        "probs", "quicklook", "runtime", "device", "precision")
                return {**entry, **{k: previous[k] for k in keep if k in previous}, "status": "skipped",
                        "worker": previous.get("worker"), "error": None,
                        "verify_seconds": round(time.perf_counter() - t0, 3)}
            if self.error is not None:
                return {**entry, "status": "failed", "error": self.error}
            try:
                summary = infer_scene(job["scene"], self.bundle, job["output"], runner=self.runner,
                                      resume=True, **job["options"])
            except InferError as e:
                return {**entry, "status": "failed", "error": str(e)}
            except Exception as e:  # reported with the scene; the other scenes go on
                return {**entry, "status": "failed", "error": f"{Path(job['scene']).name}: unexpected "
                        f"{type(e).__name__}: {e}"}
        kept = ("pixels", "seconds", "pixels_per_second", "probs", "quicklook", "runtime", "device",
                "precision", "tiles", "tiles_resumed", "peak_memory_mib", "warnings", "scene_files_sha256")
        done = {**entry, **{k: summary[k] for k in kept}, "status": "done", "error": None}
        done["outputs_sha256"] = {p: sha256_file(p) for p in output_files(done)}
        return done


def classify(job: dict[str, Any]) -> dict[str, Any]:
    """The Dask task: this worker's `BundleService` classifies one scene."""
    service = get_worker().plugins.get(PLUGIN_NAME)
    if service is None:
        return {"scene": job["scene"], "output": job["output"], "status": "failed",
                "worker": get_worker().address, "error": "this worker has not loaded the bundle"}
    return service.classify(job)
