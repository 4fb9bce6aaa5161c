"""How the command tests run the command: its exit status and what it said on stderr."""

from __future__ import annotations

from relprune.cli import main


def run(argv: list, capsys) -> tuple[int, str]:
    """Exit status and stderr of one command (argparse's exits included)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err.strip()
