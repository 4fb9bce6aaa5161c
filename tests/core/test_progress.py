"""Progress on stderr: a bar on a terminal, plain lines (no carriage returns) in a log."""

from __future__ import annotations

import relprune.core.progress as progress_module
from relprune.core.progress import progress


def test_a_log_gets_lines_at_most_every_interval_and_one_at_the_end(capsys):
    assert list(progress(range(5), desc="work", unit="items", every=0.0)) == [0, 1, 2, 3, 4]
    err = capsys.readouterr().err
    assert "\r" not in err
    assert err.splitlines()[0].startswith("work: 1/5 items, ") and err.splitlines()[-1].startswith("work: 5/5 items")
    list(progress(range(5), desc="work", every=3600.0))  # a long interval: only the closing line
    assert [line.split(",")[0] for line in capsys.readouterr().err.splitlines()] == ["work: 5/5 it"]


def test_items_can_be_named_and_progress_can_be_off(capsys):
    list(progress([("a", 1), ("b", 2)], desc="blocks", unit="done", every=0.0, name=lambda item: item[0]))
    assert "blocks: 2/2 done (b)" in capsys.readouterr().err
    assert list(progress(iter([1, 2]), desc="x", enabled=False)) == [1, 2]
    assert capsys.readouterr().err == ""


def test_an_iterator_of_unknown_length_counts_without_a_total(capsys):
    list(progress(iter(range(3)), desc="n", every=0.0))
    assert capsys.readouterr().err.splitlines()[-1].startswith("n: 3 it")
    assert progress_module.LOG_EVERY >= 10  # a log line every few seconds would drown a long run's log
