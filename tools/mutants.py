"""Mutation testing of repfx's test suite with a catalogue of targeted mutants.

    python tools/mutants.py [--only NAME ...] [--jobs 1] [--output FILE]

Each mutant of ``tools/mutants_list.py`` replaces one exact snippet of one repfx file. The
script copies the working tree once per job into a scratch directory (the real tree is never
touched), and for each mutant: writes the mutated file into the scratch copy, runs the
mutant's targeted test files (``pytest -x -q -p no:cacheprovider``, with a timeout), and — if
they all pass — the whole fast suite, before calling the mutant a survivor; then restores the
file and checks that it is restored.

Outcomes: ``killed`` (a test failed or errored, or the run timed out), ``survived`` (every test
passed), ``invalid`` (the snippet does not occur exactly once: the catalogue needs updating),
``error`` (pytest could not run: a usage error, not a verdict on the mutant). The score is
killed / (killed + survived); mutants the catalogue lists as equivalent count as survivors (the
summary also gives the score without them, and flags one that is killed). A baseline run of an
unmutated copy comes first: a test that already fails there is deselected in every mutant run
(and listed), so that a concurrent edit elsewhere cannot pass for a kill.

One line per mutant is printed as it finishes; the Markdown summary goes to ``--output`` or,
without it, to stdout.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from queue import Queue

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mutants_list import MUTANTS, Mutant

ROOT = Path(__file__).resolve().parent.parent
PYTEST = ("-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-n", "0")  # (--jobs parallelises)
FAST_SUITE = (
    "tests/",
    "--ignore=tests/test_fuzz.py",
    "-m",
    "not slow",
    "--deselect",
    "tests/test_example_train.py",
)
_IGNORED = shutil.ignore_patterns(
    ".git", ".venv", "__pycache__", ".hypothesis", ".pytest_cache", ".ruff_cache", "*.egg-info"
)
_FAILED_LINE = re.compile(r"^(?:FAILED|ERROR) (.+)$", re.MULTILINE)

KILLED, SURVIVED, INVALID, ERROR = "killed", "survived", "invalid", "error"


@dataclass
class Outcome:
    mutant: Mutant
    status: str
    detail: str = ""  # the killing test, or why the mutant is invalid / errored
    stage: str = ""  # "targeted" or "fast suite"
    seconds: float = 0.0


@dataclass
class PytestRun:
    returncode: int | None  # None: timed out
    output: str

    @property
    def first_failure(self) -> str:
        found = self.failures
        if found:
            return found[0]
        lines = [line for line in self.output.strip().splitlines() if line.strip()]
        return lines[-1] if lines else ""

    @property
    def failures(self) -> list[str]:
        """Node ids of the ``FAILED`` / ``ERROR`` lines of pytest's short summary."""
        return [node_id(m.group(1)) for m in _FAILED_LINE.finditer(self.output)]


def node_id(summary: str) -> str:
    """The node id at the start of a short-summary line ``<node id> - <message>``; a
    parametrised id may itself contain `` - `` inside its brackets."""
    depth = 0
    for i, char in enumerate(summary):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth == 0 and summary.startswith(" - ", i):
            return summary[:i]
    return summary


@dataclass
class Baseline:
    """Tests failing on the unmutated copy ``scratch``: deselected in every mutant run."""

    scratch: Path | None = None  # an unmutated copy, made with the jobs' copies
    failing: set[str] = field(default_factory=set)
    checked_fast_suite: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def deselect_args(self) -> list[str]:
        return [arg for test in sorted(self.failing) for arg in ("--deselect", test)]


# ----------------------------------------------------------------------------- scratch copies


def make_scratch(parent: Path, index: int) -> Path:
    scratch = parent / f"job{index}"
    shutil.copytree(ROOT, scratch, ignore=_IGNORED, symlinks=True)
    return scratch


def places(root: Path, mutant: Mutant) -> list[Path]:
    """The files holding ``mutant``'s snippet, one entry per occurrence. ``mutant.file`` names
    a file or a package (a folder, or a module that may become one: ``repfx/ir/ops`` means
    ``repfx/ir/ops.py`` or every ``.py`` file under ``repfx/ir/ops/``), so that a catalogue
    entry survives code moving between the modules of one package."""
    target = root / mutant.file
    if target.is_dir():
        files = sorted(target.rglob("*.py"))
    else:
        files = [f for f in (target, target.with_name(target.name + ".py")) if f.is_file()][:1]
    return [f for f in files for _ in range(f.read_text().count(mutant.original))]


def occurrences(root: Path, mutant: Mutant) -> int:
    return len(places(root, mutant))


def run_pytest(scratch: Path, args: Sequence[str], timeout: float) -> PytestRun:
    """``python -m pytest ARGS`` in ``scratch``, importing repfx from the scratch copy."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(scratch)
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # a mutated and a restored file may share an mtime
    proc = subprocess.Popen(
        [sys.executable, *PYTEST, *args],
        cwd=scratch,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # pytest and anything it started
        output, _ = proc.communicate()
        return PytestRun(None, output)
    return PytestRun(proc.returncode, output)


def existing_tests(scratch: Path, tests: Sequence[str]) -> list[str]:
    return [t for t in tests if (scratch / t.split("::")[0]).exists()]


# ----------------------------------------------------------------------------- one mutant


def verdict(run: PytestRun, stage: str) -> tuple[str, str] | None:
    """``(status, detail)`` of a pytest run on a mutant; ``None`` when every test passed."""
    if run.returncode is None:
        return KILLED, f"timed out ({stage})"
    if run.returncode == 0:
        return None
    if run.returncode in (1, 2, 3):  # test failures, collection errors, internal errors
        return KILLED, run.first_failure
    return ERROR, f"pytest exit code {run.returncode}: {run.first_failure}"


def run_mutant(
    scratch: Path, mutant: Mutant, options: argparse.Namespace, baseline: Baseline
) -> Outcome:
    """Apply ``mutant`` to ``scratch``, judge it, restore ``scratch``."""
    found = occurrences(scratch, mutant)
    if found != 1:
        return Outcome(mutant, INVALID, f"snippet found {found} times in {mutant.file}")
    [path] = places(scratch, mutant)
    original = path.read_text()
    started = time.monotonic()
    try:
        path.write_text(original.replace(mutant.original, mutant.replacement))
        outcome = _judge(scratch, mutant, options, baseline)
    finally:
        path.write_text(original)
        if path.read_text() != original:
            raise RuntimeError(f"could not restore {path}")
    outcome.seconds = time.monotonic() - started
    return outcome


def _judge(
    scratch: Path, mutant: Mutant, options: argparse.Namespace, baseline: Baseline
) -> Outcome:
    targeted = existing_tests(scratch, mutant.tests)
    if targeted:
        run = run_pytest(scratch, [*targeted, *baseline.deselect_args()], options.timeout)
        found = verdict(run, "targeted")
        if found is not None:
            return Outcome(mutant, *found, stage="targeted")
    if options.no_fallback:
        return Outcome(mutant, SURVIVED, "targeted tests pass (no fallback)", stage="targeted")
    ensure_fast_suite_baseline(baseline)
    run = run_pytest(scratch, [*FAST_SUITE, *baseline.deselect_args()], options.fallback_timeout)
    found = verdict(run, "fast suite")
    if found is not None:
        return Outcome(mutant, *found, stage="fast suite")
    return Outcome(mutant, SURVIVED, "the whole fast suite passes", stage="fast suite")


# ----------------------------------------------------------------------------- baseline


def ensure_fast_suite_baseline(baseline: Baseline) -> None:
    """Settle the fast suite on the unmutated copy once (lazily: only if a mutant needs it)."""
    with baseline.lock:
        if baseline.checked_fast_suite or baseline.scratch is None:
            return
        settle(baseline, FAST_SUITE, "fast suite")
        baseline.checked_fast_suite = True


def settle(baseline: Baseline, args: Sequence[str], what: str) -> None:
    """Run ``args`` on the unmutated copy until they pass, deselecting each failing test
    (``-x`` stops at the first); exit if the suite cannot run at all."""
    assert baseline.scratch is not None
    for _ in range(20):
        run = run_pytest(baseline.scratch, [*args, *baseline.deselect_args()], 3600)
        if run.returncode == 0:
            return
        failed = run.failures
        if run.returncode != 1 or not failed:
            sys.exit(f"baseline {what} does not run (exit {run.returncode}):\n{run.output[-3000:]}")
        baseline.failing.update(failed)
        print(f"baseline: {', '.join(failed)} fails unmutated; deselected", file=sys.stderr)
    sys.exit(f"baseline {what}: too many failing tests; fix the suite first")


# ----------------------------------------------------------------------------- report


def line(outcome: Outcome) -> str:
    where = f" [{outcome.stage}]" if outcome.stage else ""
    detail = f" — {outcome.detail}" if outcome.detail else ""
    flag = " (listed as equivalent)" if outcome.mutant.equivalent else ""
    return f"{outcome.status:9} {outcome.mutant.name}{flag}{where}{detail} ({outcome.seconds:.0f}s)"


def score(outcomes: Sequence[Outcome]) -> tuple[int, int, float]:
    """(killed, valid, killed / valid): every valid mutant counts, equivalent ones too."""
    killed = sum(o.status == KILLED for o in outcomes)
    valid = sum(o.status in (KILLED, SURVIVED) for o in outcomes)
    return killed, valid, (killed / valid if valid else 0.0)


def _survivor_line(o: Outcome) -> str:
    if o.mutant.equivalent:
        return f"- `{o.mutant.name}` (equivalent): {o.mutant.description} — {o.mutant.equivalent}"
    return f"- `{o.mutant.name}` (**not known to be equivalent**): {o.mutant.description}"


def markdown(outcomes: Sequence[Outcome], command: str, baseline: Baseline) -> str:
    killed, valid, ratio = score(outcomes)
    rows = [
        f"| {o.mutant.name} | `{o.mutant.file}` | {o.status} | {o.stage} | "
        f"{o.detail.replace('|', '/')} |"
        for o in outcomes
    ]
    survivors = [o for o in outcomes if o.status == SURVIVED]
    unexplained = [o for o in survivors if not o.mutant.equivalent]
    others = [o for o in outcomes if o.status in (INVALID, ERROR)]
    refuted = [o for o in outcomes if o.status == KILLED and o.mutant.equivalent]
    parts = [
        "# Mutation run",
        "",
        f"Command: `{command}`",
        "",
        f"Mutants: {len(outcomes)}; valid {valid}; killed {killed}; survived {len(survivors)} "
        f"({len(survivors) - len(unexplained)} listed as equivalent); "
        f"invalid / error {len(others)}.",
        "",
        f"**Score: {killed}/{valid} = {ratio:.1%}** (equivalent mutants counted as survivors; "
        f"without them {killed}/{valid - len(survivors) + len(unexplained)}).",
        "",
    ]
    if baseline.failing:
        parts += ["Deselected (failing before any mutation): " + ", ".join(baseline.failing), ""]
    parts += ["| mutant | file | outcome | stage | detail |", "|---|---|---|---|---|", *rows, ""]
    if survivors:
        parts += ["Survivors:", "", *(_survivor_line(o) for o in survivors), ""]
    if refuted:
        parts += ["Killed although listed as equivalent (the argument no longer holds):", ""]
        parts += [f"- `{o.mutant.name}`: {o.detail}" for o in refuted] + [""]
    return "\n".join(parts) + "\n"


# ----------------------------------------------------------------------------- main


def select(names: Sequence[str] | None) -> list[Mutant]:
    if not names:
        return list(MUTANTS)
    known = {m.name: m for m in MUTANTS}
    unknown = [n for n in names if n not in known]
    if unknown:
        sys.exit(f"unknown mutants: {', '.join(unknown)}")
    return [known[n] for n in names]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutants")
    parser.add_argument("--jobs", type=int, default=1, help="scratch copies run in parallel")
    parser.add_argument("--timeout", type=float, default=600, help="targeted run, seconds")
    parser.add_argument("--fallback-timeout", type=float, default=1200, help="fast suite, s")
    parser.add_argument("--no-fallback", action="store_true", help="targeted tests only")
    parser.add_argument("--no-baseline", action="store_true", help="skip the baseline runs")
    parser.add_argument("--output", type=Path, help="write the Markdown summary here")
    parser.add_argument("--list", action="store_true", help="list the catalogue and exit")
    parser.add_argument("--check", action="store_true", help="only check the snippets match")
    return parser.parse_args(argv)


def run_all(
    mutants: list[Mutant], options: argparse.Namespace, baseline: Baseline
) -> list[Outcome]:
    with tempfile.TemporaryDirectory(prefix="repfx-mutants-") as parent:
        jobs = max(1, min(options.jobs, len(mutants)))
        scratches: Queue[Path] = Queue()
        for i in range(jobs + 1):
            scratches.put(make_scratch(Path(parent), i))
        baseline.scratch = scratches.get()  # job0 stays unmutated
        targeted = sorted({t for m in mutants for t in existing_tests(baseline.scratch, m.tests)})
        if not options.no_baseline and targeted:
            settle(baseline, targeted, "targeted tests")

        def one(mutant: Mutant) -> Outcome:
            scratch = scratches.get()
            try:
                outcome = run_mutant(scratch, mutant, options, baseline)
            finally:
                scratches.put(scratch)
            print(line(outcome), flush=True)
            return outcome

        with ThreadPoolExecutor(max_workers=jobs) as pool:
            return list(pool.map(one, mutants))


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    mutants = select(options.only)
    if options.list:
        for m in mutants:
            print(f"{m.name:45} {m.file:35} {m.description}")
        return 0
    if options.check:
        bad = [(m, occurrences(ROOT, m)) for m in mutants if occurrences(ROOT, m) != 1]
        for m, n in bad:
            print(f"invalid   {m.name}: snippet found {n} times in {m.file}")
        print(f"{len(mutants) - len(bad)}/{len(mutants)} snippets match exactly once")
        return 1 if bad else 0
    baseline = Baseline(checked_fast_suite=options.no_baseline)
    outcomes = run_all(mutants, options, baseline)
    command = "python tools/mutants.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report = markdown(outcomes, command.strip(), baseline)
    if options.output:
        options.output.write_text(report)
    else:
        print(report)
    killed, valid, ratio = score(outcomes)
    print(f"score: {killed}/{valid} = {ratio:.1%}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
