"""Progress: a bar on a terminal, a line every 10% without one (under `mlflow run`), or silence."""

from __future__ import annotations

import logging

from robustlogits.core.progress import Progress


def test_without_a_terminal_a_line_every_tenth(caplog):
    with caplog.at_level(logging.INFO, logger="robustlogits"), Progress(95, "phase", "img") as bar:
        for _ in range(19):
            bar.set_postfix(loss="0.5")
            bar.update(5)
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(": ")[1].split("%")[0] for line in lines] == [str(p) for p in range(10, 101, 10)]
    assert lines[-1] == "phase: 100% (95/95 img) loss 0.5"


def test_silent_when_asked(caplog):
    with caplog.at_level(logging.INFO, logger="robustlogits"), Progress(10, "phase", enabled=False) as bar:
        bar.update(10)
    assert not caplog.records


def test_a_jump_over_several_tenths_is_one_line(caplog):
    with caplog.at_level(logging.INFO, logger="robustlogits"), Progress(10, "attack", "ex") as bar:
        bar.update(3)
        bar.update(7)
    assert [r.getMessage() for r in caplog.records] == ["attack: 30% (3/10 ex)", "attack: 100% (10/10 ex)"]
