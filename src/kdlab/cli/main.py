"""The ``kdlab`` command line.

Every user error (bad config, missing dataset, wrong checkpoint, ...) ends with one line on
stderr and a non-zero exit code; ``--debug`` shows the traceback instead.

The parser is built in :mod:`kdlab.cli.parsers` (re-exported here as :func:`build_parser`) and
the commands' handlers live in :mod:`kdlab.cli.commands`.
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Sequence

from kdlab.cli.parsers import build_parser
from kdlab.core.errors import KdlabError

__all__ = ["build_parser", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kdlab`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(message)s", stream=sys.stderr)
    try:
        return int(args.fn(args))
    except KdlabError as e:
        if args.debug:
            raise
        sys.stderr.write(f"kdlab: error: {e}\n")
        return e.exit_code
    except KeyboardInterrupt as e:  # Ctrl-C, or RunInterrupted (SIGTERM during a run)
        signum = int(getattr(e, "signum", signal.SIGINT))
        how = "" if signum == signal.SIGINT else f" by {signal.Signals(signum).name}"
        sys.stderr.write(f"kdlab: interrupted{how}; a run continues from its last checkpoint "
                         "with --resume\n")
        return 128 + signum
    except OSError as e:
        if args.debug:
            raise
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        sys.stderr.write(f"kdlab: error: {e.strerror or e}{where}\n")
        return 2
