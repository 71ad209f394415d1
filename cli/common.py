"""What every btp command line shares: exit codes, one-line errors, the shared options, JSON output, output
paths checked before the work.

Exit codes, for every `btp-*` command:

- 0: done; a check or target it ran passed.
- 1: a check or a target failed (`btp-check` found a mismatch, `btp-compile --check` too, `btp-gpu-check` had a
  failing artifact, benchmark or test).
- 2: bad input: a missing or malformed model, plan, artifact, image, prompt or data set, a bad option value, a
  missing optional package or device (a `BtpError`, or an argparse usage error). One line on stderr,
  `btp-NAME: error: what was expected, what was found`.
- 3: internal error (a bug): one line on stderr naming the exception; `--debug` shows its traceback.
- 130: interrupted (Ctrl-C).

Options that mean the same thing are spelled the same in every command that takes them:

- `--json`: print one JSON object with the command's result on stdout and nothing else there (progress, tables
  and logs go to stderr). Every command takes it.
- `--debug`: debug logs, and tracebacks instead of one-line errors. Every command takes it.
- `--max-new-tokens N`: the longest answer of a run (`btp-run`, `btp-demo`, `btp-check`, `btp-bench`, which
  forces exactly N) or the artifact's bound (`btp-compile`).
- `--max-batch N`: the largest batch an artifact accepts (a build bound); `--batch N`: the batch size of a run.
- `--threads N`: CPU threads; `--backend NAME`: the engines to build or run; `--device cpu|cuda[:N]`.
- `-o/--out PATH`: what the command writes.

Old spellings (`--new-tokens`, `--steps`, `--batch-size`) still parse as hidden, deprecated aliases.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from btp.runtime.errors import BtpError, InputError
from btp.tools.output import save_figure, stdout_to_stderr  # noqa: F401 - the commands import them from here

OK, FAILED, BAD_INPUT, INTERNAL = 0, 1, 2, 3


def add_common(p: argparse.ArgumentParser, json_help: str = "print the result as one JSON object on stdout") -> None:
    """The options every command takes: `--json` and `--debug`."""
    p.add_argument("--json", action="store_true", help=json_help)
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")


def add_alias(p: argparse.ArgumentParser, old: str, dest: str, **kwargs) -> None:
    """`old`, a deprecated spelling of the option stored in `dest`: parsed as before, left out of `--help`."""
    p.add_argument(old, dest=dest, help=argparse.SUPPRESS, default=argparse.SUPPRESS, **kwargs)


def print_json(doc: dict) -> None:
    """The command's result: one JSON object, one line, on stdout."""
    print(json.dumps(doc), flush=True)


def emit(report: dict, as_json: bool, show: Callable[[dict], None], plot_path=None,
         plot: Callable[[dict, str], object] | None = None) -> int:
    """Finish a report command: draw `plot_path` with `plot` when asked, then print the report as JSON or with
    `show`; returns exit code 0."""
    if plot_path and plot is not None:
        plot(report, plot_path)
    if as_json:
        print_json(report)
    else:
        show(report)
    return 0


def run_main(body: Callable[[], int], debug: bool, prog: str, flags: dict[str, str] | None = None,
             options=None) -> int:
    """Run a CLI body and return its exit code (see the module docstring): the body's own code (0, or 1 for a
    failed check), 2 with `prog: error: message` on stderr for a `BtpError` (naming the flag of the library
    option at fault: `flags`, else `--` + the option's dashed name where `options`, the command's parsed option
    names, hold it), 3 with one line for an unexpected exception; with `debug` both raise instead, with their
    traceback."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return body()
    except BtpError as err:
        if debug:
            raise
        print(f"{prog}: error: {err.render(flags, options)}", file=sys.stderr)
        return BAD_INPUT
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the last line of defence of a command line
        if debug:
            raise
        first = (str(err).strip().splitlines() or [""])[0]
        print(f"{prog}: internal error: {type(err).__name__}: {first} (run with --debug for the traceback)",
              file=sys.stderr)
        return INTERNAL


def check_writable(path, what: str, directory: bool = False, parents: bool = False) -> None:
    """`InputError` unless `path` can be written: a file (or with `directory` a directory) that exists and is
    writable, or one whose parent directory exists and is writable (with `parents`, whose nearest existing
    ancestor is a writable directory, the command making the rest). CLIs call it before any long work."""
    kind = "directory" if directory else "file"
    target = Path(path)

    def refuse(found: str) -> InputError:
        return InputError(f"{what} {path}: expected a writable {kind} path, found {found}")

    if target.exists():
        if target.is_dir() != directory:
            raise refuse("a directory" if target.is_dir() else "a file")
        if not os.access(target, os.W_OK | (os.X_OK if directory else 0)):
            raise refuse(f"the {kind} is not writable")
        return
    parent = target.absolute().parent
    if not parents and not parent.exists():
        raise refuse(f"parent directory {parent} does not exist")
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise refuse(f"{parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise refuse(f"parent directory {parent} is not writable")
