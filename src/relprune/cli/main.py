"""The ``relprune`` command: the parser over every subcommand, and one line for every failure."""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
from pathlib import Path
from types import ModuleType

from ..core.interrupts import terminate_as_interrupt
from ..errors import RelpruneError
from .flags import Parser
from .outputs import CREATED, remove_created

#: Modules of this package that hold no commands.
_NOT_COMMANDS = frozenset({"main", "flags", "outputs"})


def command_modules() -> list[ModuleType]:
    """Every module of this package that adds commands (a function ``add_commands(sub)``), by name: a new
    command is one file here."""
    where = sys.modules[__package__].__path__  # the package's folders (already imported: it holds this module)
    found = [importlib.import_module(f"{__package__}.{info.name}") for info in pkgutil.iter_modules(where)
             if info.name not in _NOT_COMMANDS]
    return sorted((m for m in found if hasattr(m, "add_commands")), key=lambda m: m.__name__)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = Parser(prog="relprune", description="Prune PyTorch networks by measured relative contributions.",
                    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--version", action="version", version=f"relprune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for module in command_modules():
        module.add_commands(sub)
    return parser


def _explicit_flags(argv: list[str]) -> set[str]:
    return {a[2:].split("=")[0].replace("-", "_").removeprefix("no_") for a in argv if a.startswith("--")}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    ns = parser.parse_args(argv)
    ns.overrides = _explicit_flags(argv)
    CREATED.clear()
    code = 1
    try:
        with terminate_as_interrupt():
            code = _run(ns)
    finally:
        if code != 0:
            remove_created()
        CREATED.clear()
    return code


def _run(ns: argparse.Namespace) -> int:
    """Run the chosen command; every failure is one line on stderr and an exit status."""
    name = " ".join(str(p) for p in (ns.command, getattr(ns, "llm_command", None)) if p)
    try:
        return ns.func(ns)
    except RelpruneError as err:
        print(f"relprune {name}: error: {_one_line(err)}", file=sys.stderr)
        return 1
    except OSError as err:
        where = f" {err.filename}" if err.filename else ""
        print(f"relprune {name}: error: cannot read or write{where}: {err.strerror or err}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"relprune {name}: interrupted; {_resume_hint(ns)}", file=sys.stderr)
        return 130
    except Exception as err:  # a bug, not bad input: still one line, with how to see the traceback
        if os.environ.get("RELPRUNE_DEBUG"):
            raise
        print(f"relprune {name}: internal error: {type(err).__name__}: {_one_line(err)} "
              "(rerun with RELPRUNE_DEBUG=1 for the traceback, and please report it)", file=sys.stderr)
        return 70


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _resume_hint(ns: argparse.Namespace) -> str:
    """Only train and bench resume, and only once something was saved."""
    out = Path(getattr(ns, "out", "") or ".")
    if ns.command == "train" and (out / "train.ckpt").is_file():
        return "rerun the same command to resume from the last finished epoch"
    if ns.command == "bench" and (out / "results.jsonl").is_file():
        return "rerun the same command to resume with the cells not yet finished"
    if getattr(ns, "llm_command", None) == "recover" and (Path(f"{out}.checkpoint") / "recover-state.pt").is_file():
        return f"the recovery's state is in {out}.checkpoint: rerun the same command to continue"
    return "nothing was saved"


if __name__ == "__main__":
    sys.exit(main())
