"""A census of bad inputs: how `hsiedge` answers damaged, hostile or inconsistent files and options.

    python bench/bad_inputs.py [--verbose] [--json FILE] [--seed N] [--workdir DIR]

Sets up once, in a temporary folder: SpectralMamba trained for 2 epochs on Jasper Ridge with
`hsiedge train`, exported to an fp32 bundle with `hsiedge export`, a 40 x 40 crop of the scene
written as a georeferenced GeoTIFF for `hsiedge infer`, and two Ed25519 key pairs made with
`hsiedge keygen`.  It then builds a catalogue of bad-input cases in eight families (scenes,
labels, checkpoints, manifests, signatures, outputs, resume, arguments), generated in code
(random damage is seeded), each prepared in a fresh folder, and runs the command of each
in-process with Typer's CliRunner.  Cases that could hang (FIFOs) run in a subprocess,
`python -m hsiedge.cli`, killed after 20 s; so do cases that could take the interpreter down
(damaged MATLAB / HDF5 files, absurd sizes), killed after 60 s as some do a whole run.  The
subprocesses run two at a time beside the in-process cases.

Each case ends in one of three classes:

- handled: a non-zero exit with one line of error output (warning and progress lines aside; a
  usage error may keep click's usage block when exactly one line of it gives the error), no
  traceback and no uncaught exception, every input file unchanged (sha256; a FIFO or a link by
  its type and target), nothing under an output's final name, no pickle payload run.  Some
  cases are harmless variants (an optional manifest key removed, random bit flips that may leave
  a file readable): for them exit 0 is a right answer too.
- traceback: an uncaught exception, a traceback in the output, or an error of several lines.
- unsafe: exit 0 on a bad input, an input changed or deleted, an output under its final name
  after a failure, a pickle payload that ran, a hang (no answer in the time limit) or a crash
  (the subprocess killed by a signal).  Unsafe wins over traceback.

A census, not a test: it prints a table per family (and with --verbose every case), lists
every case that was not handled, and always exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bad_input_cases import BUILDERS, FAMILIES, RUNNER, Case, Run, exists, fingerprint, set_up
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from hsiedge.cli import app

# A subprocess case that has not answered by then hangs: 20 s for cases that may block (FIFOs),
# more for those run apart only because a crash would end the census (damaged HDF5 / MATLAB v5
# files, absurd sizes), which run beside the in-process cases and may do a whole run.
ISOLATED_SECONDS = {"hang": 20, "crash": 60}
IN_PROCESS_SECONDS = 120  # safety net for in-process cases (SIGALRM)
NOISE = re.compile(r"^(warning:|training \S+: epoch|classifying: |signed )")
BASE_ENV: dict[str, str] = {}  # the environment subprocess cases start from (set in main)
console = Console(width=160)


class Hung(BaseException):
    """Raised by SIGALRM in an in-process case that ran past IN_PROCESS_SECONDS."""


@dataclass
class Outcome:
    """What a command did: exit code, output, and how it ended."""

    exit_code: int | None
    stdout: str = ""
    stderr: str = ""
    exception: str | None = None  # an uncaught exception (in-process)
    signal: str | None = None  # the subprocess was killed by this signal
    timed_out: bool = False
    seconds: float = 0.0


@dataclass
class Record:
    """A classified case, as printed and written to --json."""

    family: str
    name: str
    verdict: str  # handled, traceback, unsafe, not run
    message: str
    reasons: list[str]
    exit_code: int | None
    seconds: float
    isolate: str
    argv: list[str]


# ---------------------------------------------------------------------------------------------
# Running and classifying


@contextlib.contextmanager
def alarm(seconds: int) -> Iterator[None]:
    """Raise Hung in the main thread after `seconds` (a blocking system call is interrupted too)."""
    def ring(signum: int, frame: Any) -> None:
        raise Hung

    old = signal.signal(signal.SIGALRM, ring)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def run_in_process(run: Run, cwd: Path) -> Outcome:
    """The command through CliRunner, exceptions caught."""
    t0 = time.perf_counter()
    try:
        with alarm(IN_PROCESS_SECONDS), contextlib.chdir(cwd):
            res = RUNNER.invoke(app, run.argv, env=run.env or None, catch_exceptions=True)
    except Hung:
        return Outcome(None, timed_out=True, seconds=time.perf_counter() - t0)
    exc = res.exception
    uncaught = None if exc is None or isinstance(exc, SystemExit) else f"{type(exc).__name__}: {exc}"
    return Outcome(res.exit_code, res.stdout, res.stderr, uncaught, seconds=time.perf_counter() - t0)


def run_isolated(run: Run, cwd: Path, limit: float) -> Outcome:
    """The command as `python -m hsiedge.cli` in a subprocess, killed after `limit` seconds."""
    env = {**BASE_ENV, **run.env, "COLUMNS": "200"}  # not os.environ: CliRunner edits it meanwhile
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-m", "hsiedge.cli", *run.argv], cwd=cwd, env=env,
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace",
                           timeout=limit)
    except subprocess.TimeoutExpired as e:
        def text(b: bytes | str | None) -> str:
            return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")
        return Outcome(None, text(e.stdout), text(e.stderr), timed_out=True, seconds=time.perf_counter() - t0)
    sig = signal.Signals(-p.returncode).name if p.returncode < 0 else None
    return Outcome(p.returncode, p.stdout, p.stderr, signal=sig, seconds=time.perf_counter() - t0)


def error_lines(stderr: str) -> list[str]:
    """The lines of an error message: non-empty, warnings and progress lines aside."""
    return [line for line in stderr.splitlines() if line.strip() and not NOISE.match(line.strip())]


def usage_error_lines(stderr: str) -> list[str]:
    """The lines of click's usage block that give the error (not the 'Error' panel title)."""
    hits = []
    for line in stderr.splitlines():
        bare = line.strip(" │╭╮╰╯─|+-")
        if ("Invalid value" in line or "Error" in line) and bare != "Error":
            hits.append(bare)
    return hits


def first_line(text: str) -> str:
    lines = [line.strip(" │") for line in text.splitlines() if line.strip(" │╭╮╰╯─")]
    return lines[0] if lines else ""


def exception_line(stderr: str) -> str:
    """The `SomeError: message` line of a printed traceback, else its last line."""
    lines = [line.strip(" │") for line in stderr.splitlines() if line.strip(" │╭╮╰╯─")]
    found = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt|Exit)\b", line)]
    return (found or lines or [""])[-1]


def classify(case: Case, out: Outcome, changed: list[str], appeared: list[str],
             marker: bool) -> tuple[str, list[str], str]:
    """(verdict, reasons, message) of one case; see the module docstring for the classes."""
    unsafe: list[str] = []
    if out.timed_out:
        limit = ISOLATED_SECONDS[case.isolate] if case.isolate else IN_PROCESS_SECONDS
        unsafe.append(f"no answer in {limit} s (hang)")
    if out.signal:
        unsafe.append(f"crashed ({out.signal})")
    if out.exit_code == 0 and case.bad:
        unsafe.append("exit 0 on a bad input")
    unsafe += [f"input changed: {p}" for p in changed]
    if out.exit_code != 0 or case.bad:
        unsafe += [f"output written: {p}" for p in appeared]
    if marker:
        unsafe.append("the pickle payload ran")
    tracebacks: list[str] = []
    failed = out.exit_code not in (0, None) and not out.signal
    if out.exception:
        tracebacks.append(f"uncaught {first_line(out.exception) or 'exception'}")
    elif "Traceback" in out.stdout + out.stderr:
        tracebacks.append("a traceback in the output")
    elif failed and out.exit_code == 2 and "Usage:" in out.stderr:
        if len(usage_error_lines(out.stderr)) != 1:
            tracebacks.append(f"{len(usage_error_lines(out.stderr))} error lines in the usage message")
    elif failed and len(error_lines(out.stderr)) != 1:
        tracebacks.append(f"{len(error_lines(out.stderr))} lines of error output")
    if out.exception:
        message = out.exception
    elif "Traceback" in out.stdout + out.stderr:
        message = exception_line(out.stderr or out.stdout)
    elif out.exit_code == 2 and usage_error_lines(out.stderr):
        message = usage_error_lines(out.stderr)[0]
    elif out.exit_code == 0:
        wrote = [line for line in out.stdout.splitlines() if line.startswith("wrote ")]
        message = "exit 0: " + (wrote[0] if wrote else first_line(out.stdout))
    else:
        message = first_line("\n".join(error_lines(out.stderr))) or first_line(out.stdout)
    if unsafe:
        return "unsafe", unsafe + tracebacks, message
    if tracebacks:
        return "traceback", tracebacks, message
    if out.exit_code == 0:
        return "handled", ["accepted: a harmless variant"], message
    return "handled", [], message


@dataclass
class Prepared:
    """A case ready to run, with the state of its inputs and outputs before it."""

    case: Case
    folder: Path
    run: Run
    before: dict[Path, Any]
    existed: dict[Path, bool]


def prepare_case(case: Case, folder: Path) -> Prepared | Record:
    """Write the case's files into `folder` (a Record saying so if that fails)."""
    folder.mkdir(parents=True)
    try:
        with alarm(IN_PROCESS_SECONDS):
            run = case.prepare(folder)
    except (Exception, Hung) as e:  # a case that could not be prepared is reported
        return Record(case.family, case.name, "not run", f"preparing failed: {type(e).__name__}: {e}"[:200],
                      [], None, 0.0, case.isolate, [])
    return Prepared(case, folder, run, {p: fingerprint(p) for p in run.inputs},
                    {p: exists(p) for p in run.outputs})


def execute(p: Prepared) -> Record:
    """Run a prepared case, check what it left behind and classify it."""
    case, run = p.case, p.run
    try:
        if case.isolate:
            out = run_isolated(run, p.folder, ISOLATED_SECONDS[case.isolate])
        else:
            out = run_in_process(run, p.folder)
    finally:
        if run.cleanup is not None:
            run.cleanup()
    def shown(f: Path) -> str:
        return str(f.relative_to(p.folder)) if f.is_relative_to(p.folder) else str(f)

    changed = [shown(f) for f in run.inputs if fingerprint(f) != p.before[f]]
    appeared = [shown(f) for f in run.outputs if not p.existed[f] and exists(f)]
    marker = run.marker is not None and exists(run.marker)
    verdict, reasons, message = classify(case, out, changed, appeared, marker)
    return Record(case.family, case.name, verdict, message[:100], reasons, out.exit_code,
                  round(out.seconds, 2), case.isolate, run.argv)


def run_all(cases: list[Case], root: Path) -> list[Record]:
    """Every case, in catalogue order.  In-process cases run one by one in this thread (CliRunner
    swaps the process's streams, environment and folder); subprocess cases are prepared here and
    run meanwhile, two at a time, on worker threads."""
    slots: list[Record | Future[Record]] = []
    family = ""
    with ThreadPoolExecutor(max_workers=2) as pool:
        for i, case in enumerate(cases):
            if case.family != family:
                family = case.family
                console.print(f"[dim]{family}: {sum(c.family == family for c in cases)} cases[/dim]")
            slug = re.sub(r"[^A-Za-z0-9]+", "-", case.name).strip("-")[:40]
            prepared = prepare_case(case, root / f"{i:03d}-{case.family}-{slug}")
            if isinstance(prepared, Record):
                slots.append(prepared)
            elif case.isolate:
                slots.append(pool.submit(execute, prepared))
            else:
                slots.append(execute(prepared))
        return [s.result() if isinstance(s, Future) else s for s in slots]


# ---------------------------------------------------------------------------------------------
# Report


def summary_table(records: list[Record]) -> Table:
    t = Table(title="hsiedge bad-input census")
    for col in ("family", "cases", "handled", "tracebacks", "unsafe"):
        t.add_column(col, justify="left" if col == "family" else "right")
    not_run = any(r.verdict == "not run" for r in records)
    if not_run:
        t.add_column("not run", justify="right")

    def row(name: str, rs: list[Record], **kw: Any) -> None:
        counts = [sum(r.verdict == v for r in rs) for v in ("handled", "traceback", "unsafe", "not run")]
        t.add_row(name, str(len(rs)), *map(str, counts[:3]), *([str(counts[3])] if not_run else []), **kw)

    for family in FAMILIES:
        rs = [r for r in records if r.family == family]
        if rs:
            row(family, rs)
    row("total", records, style="bold", end_section=False)
    accepted = sum(r.verdict == "handled" and r.exit_code == 0 for r in records)
    t.caption = (f"handled includes {accepted} harmless variants answered with exit 0 "
                 "(optional manifest keys removed, bit flips that left a file readable, ...)")
    return t


def cases_table(records: list[Record]) -> Table:
    t = Table(title="every case")
    for col in ("family", "case", "outcome", "exit", "s", "message"):
        t.add_column(col, overflow="fold")
    colour = {"handled": "green", "traceback": "yellow", "unsafe": "red", "not run": "magenta"}
    for r in records:
        t.add_row(r.family, escape(r.name) + (" [dim](subprocess)[/dim]" if r.isolate else ""),
                  f"[{colour[r.verdict]}]{r.verdict}[/]", str(r.exit_code), f"{r.seconds:.1f}",
                  escape(r.message))
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--verbose", action="store_true", help="print every case's outcome and message")
    ap.add_argument("--json", type=Path, default=None, help="write every case to this JSON file")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random damage")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the cases' files here")
    ap.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    a = ap.parse_args()
    os.environ.pop("HSIEDGE_TRUSTED_KEY", None)  # every case says which keys it trusts
    BASE_ENV.update(os.environ)
    t0, load0 = time.perf_counter(), os.getloadavg()
    work = (a.workdir or Path(tempfile.mkdtemp(prefix="hsiedge-bad-inputs-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    try:
        console.print(f"setting up in {work}: training SpectralMamba (2 epochs), exporting, keys ...")
        base = set_up(work / "base")
        setup_seconds = time.perf_counter() - t0
        rng = random.Random(a.seed)
        cases = [c for f in a.families for c in BUILDERS[f](base, rng)]
        console.print(f"setup took {setup_seconds:.0f} s; running {len(cases)} cases "
                      f"({sum(bool(c.isolate) for c in cases)} in subprocesses)")
        records = run_all(cases, work / "cases")
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    if a.verbose:
        console.print(cases_table(records))
    console.print(summary_table(records))
    bad = [r for r in records if r.verdict != "handled"]
    if bad:
        console.print(f"[bold]not handled ({len(bad)}):[/bold]")
        for r in bad:
            console.print(f"  {r.verdict:9} {r.family}: {escape(r.name)}: {escape('; '.join(r.reasons))} "
                          f"[dim]{escape(r.message)}[/dim]", highlight=False, soft_wrap=True)
    if a.json is not None:
        a.json.write_text(json.dumps([asdict(r) for r in records], indent=1) + "\n")
        console.print(f"wrote {a.json}")
    seconds = time.perf_counter() - t0
    load1 = os.getloadavg()
    console.print(f"wall time {seconds:.0f} s (setup {setup_seconds:.0f} s); load average "
                  f"{load0[0]:.2f} at start, {load1[0]:.2f} / {load1[1]:.2f} / {load1[2]:.2f} "
                  f"(1 / 5 / 15 min) at the end; {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()

