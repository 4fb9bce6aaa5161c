"""The ``relprune`` command: one flag mechanism (:mod:`.flags`), shared output rules (:mod:`.outputs`),
the vision commands (:mod:`.vision`) and the language-model commands (:mod:`.llm`)."""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
