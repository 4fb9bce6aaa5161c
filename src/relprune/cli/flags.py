"""One flag mechanism for every subcommand: argparse types that check values, flags from dataclasses."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import field
from typing import Any

from ..defaults import MAX_SEED


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        """One line on stderr, exit status 2."""
        self.exit(2, f"{self.prog}: error: {message}\n")


TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def strict_bool(text: str) -> bool:
    word = text.strip().lower()
    if word not in TRUE + FALSE:
        raise ValueError(f"{text!r} is not a boolean (use true or false)")
    return word in TRUE


def comma_list(kind: type):
    def parse(text: str) -> list:
        try:
            if kind is bool:
                return [strict_bool(t) for t in text.split(",") if t.strip()]
            if set(typing.get_args(kind)) == {bool, str}:  # a switch or a named choice: true, false, obs
                words = [t.strip() for t in text.split(",") if t.strip()]
                return [strict_bool(w) if w.lower() in TRUE + FALSE else w for w in words]
            return [kind(t.strip()) for t in text.split(",") if t.strip()]
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"{text!r}: {err}") from None
    return parse


def checked(kind: type, check: Any):
    """An argparse type: convert with ``kind``, then ``check(value)`` returns an error text or None."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {text!r}") from None
        problem = check(value) if check else None
        if problem:
            raise argparse.ArgumentTypeError(f"{text}: {problem}")
        return value
    parse.__name__ = kind.__name__
    return parse


def positive(v: float) -> str | None:
    return None if v > 0 and v == v and v != float("inf") else "must be a positive number"


def non_negative(v: float) -> str | None:
    return None if v >= 0 and v != float("inf") else "must be zero or more"


def seed_value(v: int) -> str | None:
    return None if 0 <= v < MAX_SEED else "seeds are whole numbers from 0 to 2^62 - 1"


def fraction(v: float) -> str | None:
    return None if 0 <= v <= 1 else "must lie in [0, 1]"


def sparsity_value(v: float) -> str | None:
    return None if 0 <= v < 1 else "sparsity must lie in [0, 1): 1 would remove every weight"


def ratio_value(v: float) -> str | None:
    return None if 0 < v < 1 else "the ratio must lie in (0, 1): 0 removes nothing, 1 everything"


def n_m_value(text: str) -> str | None:
    from ..core.allocation import parse_n_m
    from ..errors import SparsityError

    try:
        parse_n_m(text)
    except SparsityError as err:
        return str(err)
    return None


def one_of(*names: str):
    def check(v: str) -> str | None:
        return None if v in names else f"choose from {', '.join(names)}"
    return check


def refit_name(v: str) -> str | None:
    """The vision command's --reconstruct: a re-fit of the registry, 'none' or 'auto'."""
    from ..core.reconstruct import REFITS

    choices = [*REFITS, "none", "auto"]
    return None if v in choices else f"choose from {', '.join(choices)}"


def refit_choices() -> str:
    """The registered re-fits for a --help text: "'exact' (least squares), 'obs' (SparseGPT's ...)"."""
    from ..core.reconstruct import REFITS

    return ", ".join(f"'{name}' ({r.summary})" for name, r in REFITS.items())


def criterion_name(v: str) -> str | None:
    from ..core.criteria import CRITERIA

    return None if v in CRITERIA else f"unknown criterion; choose from {', '.join(CRITERIA)}"


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, defaults: dict[str, Any] | None = None) -> None:
    """A flag per dataclass field: --snake-case NAME, lists comma-separated, bools --x/--no-x.

    ``defaults`` replaces field defaults for this parser (shown in --help too).
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if defaults and f.name in defaults:
            default = defaults[f.name]
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        flag = "--" + f.name.replace("_", "-")
        doc = (f.metadata or {}).get("help", "")
        check = (f.metadata or {}).get("check")
        args = typing.get_args(kind)
        optional = type(None) in args
        base = next((a for a in args if a is not type(None)), kind) if optional else kind
        if typing.get_origin(base) is list:
            inner = typing.get_args(base)[0]
            shown = ",".join(str(v) for v in default)
            parser.add_argument(flag, type=comma_list(inner), default=default, dest=f.name,
                                help=f"{doc} (comma-separated; default: {shown or 'none'})")
        elif base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, dest=f.name,
                                help=f"{doc} (default: {default})")
        else:
            parser.add_argument(flag, type=checked(base, check), default=default, dest=f.name,
                                help=f"{doc} (default: {default})")


def from_args(cls: type, ns: argparse.Namespace) -> Any:
    return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if hasattr(ns, f.name)})


def option(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING,
       check: Any = None) -> Any:
    """A field with its --help text and an optional ``check(value) -> error text or None``."""
    meta = {"help": text, "check": check}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def criterion_names() -> list[str]:
    from ..core.criteria import CRITERIA

    return list(CRITERIA)


def regularizer_names() -> list[str]:
    from ..train.regularizers import REGULARIZERS

    return list(REGULARIZERS)

