"""``python -m relprune`` and the ``relprune`` command: the command, answering Ctrl-C even while it loads."""

from __future__ import annotations

import sys


def main() -> int:
    """Load and run the command; an interrupt before a command starts is one line, not a traceback."""
    try:
        from .cli import main as run

        return run()
    except KeyboardInterrupt:
        print("relprune: interrupted before any work; nothing was done", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
