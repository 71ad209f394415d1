"""What every btp command line shares: one-line errors and exit code 2 for bad input, `--debug` tracebacks,
output paths checked before the work."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from .errors import BtpError, InputError


def run_main(body: Callable[[], int], debug: bool, prog: str) -> int:
    """Run a CLI body: a `BtpError` becomes `prog: error: message` on stderr and exit code 2; an unexpected
    exception exits 1 with one line (or its traceback with `debug`)."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return body()
    except BtpError as err:
        if debug:
            raise
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the last line of defence of a command line
        if debug:
            raise
        first = (str(err).strip().splitlines() or [""])[0]
        print(f"{prog}: internal error: {type(err).__name__}: {first} (run with --debug for the traceback)",
              file=sys.stderr)
        return 1


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
