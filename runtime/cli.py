"""What every btp command line shares: one-line errors and exit code 2 for bad input, `--debug` tracebacks."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from .errors import BtpError


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
