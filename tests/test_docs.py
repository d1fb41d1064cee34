"""Every fenced block of the user docs runs, and prints what the doc shows — or says why not.

The docs are README.md, docs/*.md and benchmarks/README.md. Each fenced block has a language,
and the language says what this file does with it:

* ```python — executed on its own, in a fresh namespace and a scratch directory, one thread;
  first a static check that it reads no name it does not define or import itself.
* ```console — a terminal session: each ``$ command`` line is run, in order, in one scratch
  directory, and what it prints (stdout and stderr, interleaved as a terminal shows them) is
  compared with the lines under it, up to the next ``$``. The commands run in-process
  (``repfx ...`` through ``repfx.cli.main``, ``python -c CODE`` through ``exec``, ``echo $?``
  and ``> FILE`` as a shell does), which saves importing torch once per command.
* ```text — illustrative, never run: formulas, diagrams, a command synopsis.
* ```bash / ```sh — commands without their output (installing, benchmarks, mutation runs):
  never run, and the doc must say so with ``<!-- not run: REASON -->`` on the line above the
  fence. A ```python or ```console block may carry the same mark.

What a run prints is compared after :func:`normalised` replaced, on both sides, the numbers
that change from run to run (durations, error figures, latencies, file sizes, thread counts)
by ``<n>``: words, structure and integer counts (``235 → 91 ops``) must match exactly.

Blocks slower than about 5 s run only in the full suite (``pytest --full``); :data:`SLOW` lists
them with their measured times. To regenerate the outputs of the console blocks from real runs
(one thread, as the test runs them) after a change of wording::

    python tests/test_docs.py --write            # every doc
    python tests/test_docs.py --write README.md  # one
"""

from __future__ import annotations

import argparse
import ast
import builtins
import contextlib
import difflib
import io
import logging
import os
import re
import shlex
import sys
import tempfile
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted(REPO.glob("docs/*.md")), REPO / "benchmarks" / "README.md"]
# Everything a user reads, for the link check: the docs and the benchmark results.
USER_DOCS = [*DOCS, *sorted(set(REPO.glob("benchmarks/*.md")) - set(DOCS))]

RUN = {"python", "console"}  # languages whose blocks are run
ILLUSTRATIVE = {"text"}  # never run, no mark needed
COMMANDS = {"bash", "sh"}  # never run, and marked so
PROMPT = "$ "

# Blocks that take more than about 5 s, run by `pytest --full` only: a text found in exactly
# one block → what it costs (measured on the shared 2-core machine, one thread).
SLOW = {
    "--benchmark": "18 s: RIFormer-S12 folded, written as ONNX, exported unfolded, timed",
    'torch.compile(model, backend="repfx")': "20 s: two dynamo captures, one compiled by inductor",
}

_FENCE = re.compile(r"^```(?P<lang>[^\n`]*)\n(?P<source>.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)
_NOT_RUN = re.compile(r"<!--\s*not run:\s*(?P<why>.+?)\s*-->")


# ------------------------------------------------------------------------------------ blocks


@dataclass(frozen=True)
class Block:
    """One fenced block of a doc: its language, its text and where it is."""

    doc: Path
    line: int  # of the block's first line of text (the one after the opening fence)
    lang: str
    source: str
    start: int  # character offsets of `source` in the doc
    end: int
    not_run: str | None  # the reason of a `<!-- not run: REASON -->` above the fence

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(REPO)}:{self.line}"

    @property
    def slow(self) -> bool:
        return any(key in self.source for key in SLOW)

    @property
    def runs(self) -> bool:
        return self.lang in RUN and self.not_run is None


def blocks_of(doc: Path, text: str | None = None) -> list[Block]:
    """The fenced blocks of ``doc`` (of ``text``, when given, as if it were ``doc``'s text)."""
    text = doc.read_text(encoding="utf-8") if text is None else text
    found = []
    for m in _FENCE.finditer(text):
        above = text[: m.start()].rstrip("\n").rpartition("\n")[2]
        mark = _NOT_RUN.search(above)
        found.append(
            Block(
                doc=doc,
                line=text.count("\n", 0, m.start("source")) + 1,
                lang=m.group("lang").strip(),
                source=m.group("source"),
                start=m.start("source"),
                end=m.end("source"),
                not_run=mark.group("why") if mark else None,
            )
        )
    return found


BLOCKS = [block for doc in DOCS for block in blocks_of(doc)]


def blocks_to_run(lang: str) -> list:
    """The blocks of ``lang`` that run, as pytest params: the slow ones marked so."""
    return [
        pytest.param(b, id=b.where, marks=[pytest.mark.slow] if b.slow else [])
        for b in BLOCKS
        if b.lang == lang and b.runs
    ]


# ----------------------------------------------------------------------- console sessions


@dataclass(frozen=True)
class Step:
    """A command of a console block and the output the doc shows under it."""

    command: str
    output: str


def steps_of(source: str) -> list[Step]:
    """The ``$ command`` lines of a console block, each with the lines under it."""
    steps: list[Step] = []
    lines = source.splitlines()
    assert lines and lines[0].startswith(PROMPT), "a console block starts with `$ command`"
    for line in lines:
        if line.startswith(PROMPT):
            steps.append(Step(line.removeprefix(PROMPT), ""))
        else:
            last = steps[-1]
            steps[-1] = Step(last.command, f"{last.output}{line}\n")
    return steps


def exit_code(exc: SystemExit) -> int:
    """The status a process exiting with ``exc`` returns, as ``sys.exit`` computes it."""
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)
    return 1


def run_repfx(args: list[str]) -> int:
    """``repfx ARGS``: the command's entry point, in-process."""
    from repfx.cli import main

    try:
        return main(args)
    except SystemExit as exc:  # argparse: --help, --version, a usage error
        return exit_code(exc)


def run_python(args: list[str]) -> int:
    """``python -c CODE``, in-process: ``CODE`` runs as ``__main__`` in a fresh namespace."""
    assert args[:1] == ["-c"] and len(args) == 2, f"only `python -c CODE` runs here: {args}"
    try:
        exec(compile(args[1], "<string>", "exec"), {"__name__": "__main__"})
    except SystemExit as exc:
        return exit_code(exc)
    except Exception:
        traceback.print_exc()
        return 1
    return 0


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Print a warning to stderr, as a Python process does."""
    text = warnings.formatwarning(message, category, filename, lineno, line)
    (file or sys.stderr).write(text)


@contextlib.contextmanager
def python_warning_defaults() -> Iterator[None]:
    """Warnings as a fresh interpreter treats them — printed to stderr once per place, the
    deprecation, import and resource ones ignored — instead of the test suite's filters."""
    with warnings.catch_warnings():
        warnings.resetwarnings()
        warnings.simplefilter("default")
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning):
            warnings.simplefilter("ignore", category)
        warnings.simplefilter("ignore", ResourceWarning)
        warnings.showwarning = _print_warning
        yield


class Shell:
    """Runs the commands of a console block in the current directory, in-process, and says what
    each printed as a terminal would show it (stdout and stderr interleaved).

    Programs: ``repfx``, ``python -c``, and ``echo`` (``$?`` is the last command's exit code);
    ``> FILE`` sends stdout to FILE.
    """

    def __init__(self) -> None:
        self.status = 0
        self.programs: dict[str, Callable[[list[str]], int]] = {
            "repfx": run_repfx,
            "python": run_python,
            "echo": self.echo,
        }

    def echo(self, args: list[str]) -> int:
        print(" ".join(args).replace("$?", str(self.status)))
        return 0

    def run(self, command: str) -> str:
        """Run ``command``; what it printed to the terminal."""
        argv = shlex.split(command)
        redirect = argv.index(">") if ">" in argv else None
        target = argv[redirect + 1] if redirect is not None else None
        argv = argv[:redirect]
        assert argv and argv[0] in self.programs, f"the docs test cannot run `{command}`"
        terminal = io.StringIO()
        stdout = io.StringIO() if target else terminal
        with (
            contextlib.redirect_stdout(stdout),
            contextlib.redirect_stderr(terminal),
            python_warning_defaults(),
        ):
            self.status = self.programs[argv[0]](argv[1:])
        if target:
            Path(target).write_text(stdout.getvalue(), encoding="utf-8")
        return terminal.getvalue()


# ------------------------------------------------------------------------ normalisation

_N = "<n>"
# Run-dependent numbers, replaced by `<n>` in this order: (pattern, replacement).
_RUN_DEPENDENT = [
    # a duration or a latency: "6.9 s", "133.82 ms", "43 s"
    (r"(?<![\w.])\d+(?:\.\d+)?(?= m?s\b)", _N),
    # a thread count, machine-dependent: "2 threads", "1 thread"
    (r"(?<![\w.])\d+ threads?\b", f"{_N} threads"),
    # an error figure, whatever its form ("0", "4e-07", "0.0"): after the words that give one
    (r"\b(abs|rel|error|difference|up to|_error': ) ?[-+]?\d[\w.+-]*", rf"\1 {_N}"),
    # any other decimal fraction or number in exponent notation: ratios, speed-ups, sizes
    (r"(?<![\w.])[-+]?\d+(?:\.\d+(?:e[-+]?\d+)?|e[-+]?\d+)(?![\w.])", _N),
    (r"(?<![\w.])\d+\.\d+(?=x\b)", _N),  # "1.25x"
]
_SPACES_AROUND_N = re.compile(r" *<n> *")
_TIMING = re.compile(r"[\w.-]+ <n> s")  # one item of a list of timings, once normalised


def timings_sorted(line: str) -> str:
    """``line`` with the items of a list of timings (``time per pass: a <n> s, b <n> s``),
    which is ordered by time and so from run to run differently, in alphabetical order."""
    head, colon, items = line.partition(": ")
    parts = items.split(", ")
    if colon and len(parts) > 1 and all(_TIMING.fullmatch(part) for part in parts):
        return f"{head}{colon}{', '.join(sorted(parts))}"
    return line


def normalised(output: str) -> list[str]:
    """``output``'s lines with every run-dependent number replaced by ``<n>`` (and the spaces
    around it, which align columns, by one), lists of timings sorted, trailing spaces and blank
    edges dropped. Integers that count something (ops, nodes, parameters, blocks) are kept."""
    lines = []
    for line in output.strip("\n").splitlines():
        for pattern, replacement in _RUN_DEPENDENT:
            line = re.sub(pattern, replacement, line)
        lines.append(timings_sorted(_SPACES_AROUND_N.sub(f" {_N} ", line).rstrip()))
    return lines


def difference(expected: str, actual: str) -> str:
    """A unified diff of the normalised lines, for an assertion message."""
    diff = difflib.unified_diff(
        normalised(expected), normalised(actual), "the doc", "the run", lineterm=""
    )
    return "\n".join(diff)


# ----------------------------------------------------------------------- python snippets


def unbound_names(source: str) -> set[str]:
    """Names ``source`` reads that it neither binds (assignment, import, def, loop or
    comprehension target, argument, ``except ... as``) nor gets from builtins."""
    bound: set[str] = set(dir(builtins))
    read: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Name):
            (read if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, ast.alias):
            bound.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
    return read - bound


@pytest.fixture
def isolated_process_state(tmp_path, monkeypatch):
    """A scratch working directory and one thread while a block runs; torch's thread count,
    dynamo's caches and the logging configuration (levels, root handlers) as they were
    afterwards."""
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    manager = logging.Logger.manager
    levels = {n: lg.level for n, lg in manager.loggerDict.items() if isinstance(lg, logging.Logger)}
    root_handlers, root_level = list(logging.root.handlers), logging.root.level
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch._dynamo.reset()
        logging.root.handlers[:] = root_handlers
        logging.root.setLevel(root_level)
        for name, logger in manager.loggerDict.items():
            if isinstance(logger, logging.Logger):
                logger.setLevel(levels.get(name, logging.NOTSET))


# --------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("block", blocks_to_run("python"))
def test_python_block_is_self_contained_and_runs(block, isolated_process_state):
    missing = unbound_names(block.source)
    assert not missing, f"{block.where} uses names it does not define: {sorted(missing)}"
    namespace: dict[str, object] = {"__name__": f"doc_snippet_{block.line}"}
    exec(compile(block.source, block.where, "exec"), namespace)  # raises if the block fails


@pytest.mark.parametrize("block", blocks_to_run("console"))
def test_console_block_prints_what_the_doc_shows(block, isolated_process_state):
    shell = Shell()
    for step in steps_of(block.source):
        printed = shell.run(step.command)
        assert normalised(printed) == normalised(step.output), (
            f"{block.where}: `$ {step.command}` prints otherwise:\n"
            f"{difference(step.output, printed)}"
        )


@pytest.mark.parametrize("block", BLOCKS, ids=[b.where for b in BLOCKS])
def test_block_runs_or_says_why_not(block):
    """Nothing is skipped silently: a block runs, is illustrative text, or is marked."""
    assert block.lang in RUN | ILLUSTRATIVE | COMMANDS, (
        f"{block.where}: a fence needs a language: python or console (run), text "
        f"(illustrative) or bash / sh (with `<!-- not run: REASON -->` above it); "
        f"got {block.lang!r}"
    )
    if block.lang in COMMANDS:
        assert block.not_run, f"{block.where}: a {block.lang} block is not run: say why"
    if block.lang in ILLUSTRATIVE:
        prompts = [ln for ln in block.source.splitlines() if ln.startswith(PROMPT)]
        assert not prompts, f"{block.where}: a session with `$` prompts is a console block"
    if block.lang == "console":
        assert block.source.startswith(PROMPT), f"{block.where}: start with `$ command`"


@pytest.mark.parametrize("doc", DOCS, ids=[str(p.relative_to(REPO)) for p in DOCS])
def test_every_fence_opens_a_block_seen_here(doc):
    """No block escapes the checks above: every fence line (indented or not, ``` or ~~~)
    opens or closes a block that :func:`blocks_of` found."""
    text = doc.read_text(encoding="utf-8")
    fences = [ln for ln in text.splitlines() if ln.lstrip().startswith(("```", "~~~"))]
    assert len(fences) == 2 * len(blocks_of(doc)), f"{doc.name}: a fence this test misses"


def source_next_to(script: Path) -> str:
    """The Python source of ``script``'s folder, where its options (its own, or those of the
    helpers it imports from a neighbour) are spelled."""
    return "".join(path.read_text(encoding="utf-8") for path in script.parent.glob("*.py"))


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.lang in COMMANDS], ids=lambda b: b.where)
def test_commands_not_run_name_scripts_and_options_that_exist(block):
    """A command block is not run, but the scripts it names exist, with the ``--options`` it
    passes them, and it runs them with the ``python`` of the environment the quick start sets
    up (never ``.venv/bin/python``)."""
    for command in block.source.splitlines():
        words = shlex.split(command, comments=True)
        assert not any(".venv" in w for w in words), f"{block.where}: plain `python`, please"
        scripts = [REPO / w for w in words if w.endswith(".py") and "/" in w]
        for script in scripts:
            assert script.is_file(), f"{block.where}: {script.relative_to(REPO)} does not exist"
        options = [w.partition("=")[0] for w in words if w.startswith("--")]
        for option in options if scripts else []:
            assert f'"{option}"' in source_next_to(scripts[0]), f"{block.where}: no {option}"


def test_every_slow_key_names_one_block():
    for key in SLOW:
        holders = [b.where for b in BLOCKS if key in b.source]
        assert len(holders) == 1, f"SLOW key {key!r} is in {holders or 'no block'}"
        assert all(b.runs for b in BLOCKS if key in b.source), f"{key!r}: that block never runs"


def test_normalised_replaces_measurements_and_keeps_counts():
    doc = (
        "  235 → 91 ops; parameters 11,921,832 → 11,908,520; verification ok (2 checks)\n"
        "  verification ok (as given): 1 output, max abs 5.96e-08, max rel 1.72e-07"
        " (tolerance 1e-05)\n"
        "  time: fold 6.9 s, whole run 7.1 s\n"
        "wrote riformer_s12.onnx (onnx, 47.8 MB)\n"
        "    Add                       49 -> 49\n"
        "benchmark: 133.82 ms -> 107.37 ms (speedup 1.25x), 30 rounds, 2 threads; ratio 0.824\n"
        "{'max_abs_error': 0.0, 'passed': True}\n"
        "  time per pass: cleanup 0.13 s, fold_bn 0.05 s, merge_branches 0.00 s\n"
    )
    run = doc.replace("5.96e-08", "0").replace("6.9 s", "12 s").replace("2 threads", "1 thread")
    run = run.replace("133.82 ms", "9.1 ms").replace("1.25x", "14.03x").replace("0.0,", "4e-07,")
    run = run.replace("cleanup 0.13 s, fold_bn 0.05 s", "fold_bn 0.31 s, cleanup 0.02 s")
    assert normalised(run) == normalised(doc)
    assert normalised(doc)[:3] == [
        "  235 → 91 ops; parameters 11,921,832 → 11,908,520; verification ok (2 checks)",
        "  verification ok (as given): 1 output, max abs <n> , max rel <n> (tolerance <n> )",
        "  time: fold <n> s, whole run <n> s",
    ]
    assert normalised(doc.replace("235 → 91", "235 → 92")) != normalised(doc)
    assert normalised(doc.replace("(2 checks)", "(1 check)")) != normalised(doc)
    assert normalised(doc.replace("49 -> 49", "49 -> 48")) != normalised(doc)


def test_shell_runs_echo_of_the_exit_code_and_redirects(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shell = Shell()
    assert shell.run("python -c \"import sys; print('to the file'); sys.exit(3)\" > out.txt") == ""
    assert (tmp_path / "out.txt").read_text() == "to the file\n"
    assert shell.run("echo $?") == "3\n"
    assert shell.run("python -c \"import sys; print('hi', file=sys.stderr)\"") == "hi\n"
    assert steps_of("$ a\none\ntwo\n$ b\n") == [Step("a", "one\ntwo\n"), Step("b", "")]


@pytest.mark.parametrize("doc", USER_DOCS, ids=[str(p.relative_to(REPO)) for p in USER_DOCS])
def test_user_docs_are_self_contained(doc):
    """Everything a user reads lives in the repository: no link leaves it (other than to the
    web), every relative link resolves, and nothing speaks of the project's issue tracker."""
    text = doc.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        resolved = (doc.parent / target).resolve()
        assert resolved.is_relative_to(REPO.resolve()), f"{target} leaves the repository"
        assert resolved.exists(), f"{target} does not exist"
    assert "../shared" not in text
    assert not re.search(r"\bissues?\b", text, re.IGNORECASE), "speaks of issues"


# ------------------------------------------------------------------------- regeneration


def session_as_run(source: str) -> str:
    """A console block's text with the output under each command replaced by what it prints
    now (run in a scratch directory)."""
    shell = Shell()
    parts = []
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as scratch:
        os.chdir(scratch)
        try:
            for step in steps_of(source):
                printed = shell.run(step.command)
                parts.append(f"{PROMPT}{step.command}\n{printed}")
        finally:
            os.chdir(cwd)
    return "".join(parts)


def write_console_outputs(doc: Path) -> int:
    """Rewrite the output of every run console block of ``doc`` from a real run; how many
    blocks changed."""
    text = doc.read_text(encoding="utf-8")
    changed = 0
    for block in reversed(blocks_of(doc, text)):
        if block.lang == "console" and block.runs:
            print(f"running {block.where} ...", file=sys.stderr)
            fresh = session_as_run(block.source)
            changed += fresh != block.source
            text = text[: block.start] + fresh + text[block.end :]
    doc.write_text(text, encoding="utf-8")
    return changed


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Regenerate the docs' console outputs.")
    parser.add_argument("--write", action="store_true", required=True)
    parser.add_argument("docs", nargs="*", type=Path, help="docs to rewrite (default: all)")
    chosen = [p.resolve() for p in parser.parse_args().docs] or DOCS
    torch.set_num_threads(1)  # as the test runs them
    for path in chosen:
        print(f"{path.relative_to(REPO)}: {write_console_outputs(path)} block(s) changed")
