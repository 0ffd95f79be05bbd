"""`infer_many`: a catalogue of scenes through one bundle on Dask, one task per scene.

The client verifies the bundle, checks the outputs, starts a `LocalCluster` (or connects to a
scheduler), registers the `BundleService` worker plugin and submits one `classify` task per
scene.  Dask reschedules the task of a worker that dies (up to its `allowed-failures`); the
task resumes from the scene's staging journal.  A scene that fails for its own reasons is
recorded with its error and the others go on.  The run report is rewritten as scenes finish.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hsiedge.bundle import Bundle
from hsiedge.many.catalogue import outputs_for
from hsiedge.many.report import REPORT_NAME, RunReport, read_report
from hsiedge.many.worker import BundleService, classify

# Dask's housekeeping wakes every 10-100 ms (the worker's profiler sampling the running task,
# event-loop ticks, work stealing, memory and system monitors).  On a small machine each wake
# takes a core from a worker's parallel kernels, which then wait for it: a 10,000-pixel
# SpectralMamba scene took 1.65x its time in a lone worker with Dask's defaults, and no more
# than in the client process beside it with these (2-core machine).  An idle worker went from
# 4 % of a core to 0.4 %.  Scenes take seconds to hours; once a second is often enough.
LOCAL_DASK_CONFIG = {
    "distributed.admin.tick.interval": "1s",
    "distributed.admin.system-monitor.interval": "1s",
    "distributed.worker.memory.monitor-interval": "1s",
    "distributed.scheduler.work-stealing-interval": "1s",
    "distributed.worker.profile.enabled": False,  # a stack sample of the running task every 10 ms
}


class ManyError(RuntimeError):
    """The run as a whole cannot start; the message says why in one sentence."""


def default_workers() -> int:
    """Local worker processes by default: one per core, at most 4 (memory grows with them)."""
    return min(4, len(os.sched_getaffinity(0)))


def local_threads(workers: int) -> int:
    """CPU threads for each of `workers` local worker processes: the cores shared out evenly."""
    return max(1, len(os.sched_getaffinity(0)) // workers)


def _journal(output: Path) -> Path:
    return output.with_name(f".{output.name}.journal")


def worker_environ(threads: int) -> dict[str, str]:
    """Environment of local worker processes.  Dask's defaults for them (1 thread for OpenMP,
    MKL and OpenBLAS; glibc trimming the heap above 64 KiB) would halve hsiedge's speed: the
    threads are the worker's share of the cores, and the heap is bounded as `hsiedge.memory`
    bounds it in any run (18 real scenes in one process, 2-core machine: 23-24 s with Dask's
    trimming setting, 16-18 s without)."""
    from hsiedge.memory import M_TRIM_THRESHOLD, SETTINGS

    trim = next(value for option, _, value in SETTINGS if option == M_TRIM_THRESHOLD)
    return {"MALLOC_TRIM_THRESHOLD_": str(trim),
            **{v: str(threads) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}}


def _client(scheduler: str | None, workers: int, threads: int, dashboard: bool) -> tuple[Any, Any]:
    """(client, cluster or None): connected to `scheduler`, or to a new local cluster of
    `workers` processes that run one scene at a time each, on `threads` threads."""
    import dask
    from distributed import Client, LocalCluster

    if scheduler is not None:
        try:
            return Client(scheduler, timeout="20s"), None
        except (OSError, TimeoutError) as e:
            raise ManyError(f"cannot reach the Dask scheduler at {scheduler} ({e})") from None
    try:
        import bokeh  # noqa: F401 - the dashboard's one extra need
    except ImportError:
        dashboard = False
    with dask.config.set(LOCAL_DASK_CONFIG):  # the scheduler here and the workers it spawns
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                               dashboard_address=":0" if dashboard else None, silence_logs=logging.ERROR,
                               env=worker_environ(threads))
    return Client(cluster), cluster


def infer_many(scenes: list[Path], bundle: Bundle, out_dir: Path, *, scheduler: str | None = None,
               workers: int | None = None, threads: int | None = None, runtime: str | None = None,
               resume: bool = False, options: dict[str, Any] | None = None, quicklook: bool = False,
               trusted_keys: list[Path] | None = None, dashboard: bool = True,
               on_start: Callable[[str | None, int], None] | None = None,
               on_scene: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Classify every scene into `out_dir`; return the run report (also written to
    `out_dir/hsiedge-run.json`).  `options` are `infer_scene`'s (tile, overlap, batch, probs,
    memory_mib, key).  `on_start(dashboard link, scenes)` and `on_scene(entry)` report progress."""
    from distributed import as_completed

    options = dict(options or {})
    workers = workers or default_workers()
    out_dir = out_dir.absolute()
    scenes = [Path(s).absolute() for s in scenes]
    outputs = outputs_for(scenes, out_dir)
    report_path = out_dir / REPORT_NAME
    if not resume:
        stale = [_journal(o) for o in outputs.values() if _journal(o).exists()]
        if stale:
            raise ManyError(f"{stale[0]}: an interrupted run of this output is here; pass --resume to "
                            "continue it, or delete the file to start over")
    defining = {"bundle_manifest_sha256": bundle.manifest_sha256, "runtime": runtime, "quicklook": quicklook,
                "options": json.loads(json.dumps(options))}
    previous = read_report(report_path) if resume else None
    if previous is not None and any(previous.get(k) != v for k, v in defining.items()):
        previous = None  # another bundle or other options: nothing it finished counts
    done_before = {e["scene"]: e for e in (previous or {}).get("scenes", [])}
    threads = threads or (local_threads(workers) if scheduler is None else None)
    report = RunReport(report_path, {"bundle": str(bundle.path.absolute()), **defining,
                                     "scheduler": scheduler or f"local ({workers} worker processes)",
                                     "threads_per_worker": threads},
                       # what the previous run proved stays until this run has verified it again
                       [done_before.get(str(s))
                        or {"scene": str(s), "output": str(outputs[s]), "status": "pending"} for s in scenes])
    report.write()
    client, cluster = _client(scheduler, workers, threads or 1, dashboard)
    try:
        client.register_plugin(BundleService(str(bundle.path.absolute()), bundle.manifest_sha256,
                                             [str(k) for k in trusted_keys or ()], runtime, threads))
        report.started()  # workers up, bundle verified and runner open on each
        if on_start:
            link = getattr(client, "dashboard_link", None) if (dashboard or scheduler) else None
            on_start(link, len(scenes))
        jobs = {}
        for i, scene in enumerate(scenes):
            out = outputs[scene]
            look = {"quicklook": str(out.with_suffix(".png"))} if quicklook else {}
            job = {"scene": str(scene), "output": str(out), "previous": done_before.get(str(scene)),
                   "options": {**options, **look}}
            jobs[client.submit(classify, job, key=f"hsiedge-scene-{i}-{scene.name}", pure=False)] = job
        for future in as_completed(jobs):
            job = jobs[future]
            if future.status == "finished":
                entry = future.result()
            else:  # the task itself died: its workers were killed too often (Dask's allowed-failures)
                e = future.exception()
                entry = {"scene": job["scene"], "output": job["output"], "status": "failed",
                         "error": f"{Path(job['scene']).name}: {type(e).__name__}: {e}"}
            report.record(entry)
            if on_scene:
                on_scene(entry)
        return report.write(finished=True)
    except BaseException:  # Ctrl-C, a lost scheduler: keep every scene finished so far for --resume
        with contextlib.suppress(OSError):
            report.write()
        raise
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
