"""Progress on long work: a bar on a terminal, a log line every 10% elsewhere (e.g. under
`mlflow run`, whose output is a log, not a terminal), or nothing when asked for silence."""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("robustlogits")


class Progress:
    """`enabled`: True = bar, False = silent, None = a bar on a terminal, else lines every `every`."""

    def __init__(self, total: int, desc: str, unit: str = "it", enabled: bool | None = None, every: float = 0.1):
        self.total, self.desc, self.unit, self.every = max(int(total), 0), desc, unit, every
        self.done, self.postfix, self._next_line = 0, "", every
        if enabled is None:
            enabled = sys.stderr.isatty() or "lines"
        self.mode = "lines" if enabled == "lines" else ("bar" if enabled else "off")
        self.bar = None
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=self.total, desc=desc, unit=unit, unit_scale=unit == "img", leave=False, dynamic_ncols=True
            )

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.mode == "lines" and self.total and self.done / self.total >= self._next_line - 1e-9:
            crossed = min(int(self.done / self.total / self.every + 1e-9) * self.every, 1.0)  # one line per jump
            log.info(
                "%s: %d%% (%d/%d %s)%s",
                self.desc,
                round(100 * crossed),
                self.done,
                self.total,
                self.unit,
                f" {self.postfix}" if self.postfix else "",
            )
            self._next_line = crossed + self.every

    def set_postfix(self, refresh: bool = False, **values) -> None:
        self.postfix = " ".join(f"{k} {v}" for k, v in values.items())
        if self.bar is not None:
            self.bar.set_postfix(values, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
