"""How far a run is, told on stderr.

A line when a phase starts (compilation; setup shows on the bar only, since it can end in
a usage error that must stay the only line) and when it ends, with its duration; then
on a terminal (or in a notebook) a tqdm bar, shown from the first phase on, and off a
terminal (a log file, a pipe, a batch job) a line after the first chunk, every `every_s`
seconds and at the end:

    train mlp_bn: setup (dataset mnist_digits, model mlp, norm batch) done in 2.1s
    train mlp_bn: compile (chunks of 500 steps, evaluation) ...
    train mlp_bn: compile done in 1.4s
    train mlp_bn: step 500/3000 (17%)  loss 0.4012  3,120 steps/s  ETA 1s

Steps per second count from the end of compilation (this session's steps only).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

from tqdm.std import tqdm  # a text bar everywhere: tqdm.auto needs ipywidgets in a notebook

EVERY_S = 10.0  # seconds between progress lines off a terminal


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else (f"{m}:{s:02d}" if m else f"{s}s")


class Progress:
    """Phase lines, then a bar (terminal) or periodic lines (elsewhere) for `total` steps.

        p = Progress("train mlp_bn", total=3000)
        with p.phase("setup"):
            ...
        p.start(step=0)          # the timed part begins (after compilation)
        p.update(500, loss=0.4)  # after each fetched chunk
        p.close()
    """

    def __init__(self, name: str, total: int, *, every_s: float = EVERY_S, file=None, quiet: bool = False):
        self.name, self.total, self.every_s = name, int(total), float(every_s)
        # quiet: the processes of a multi-process run other than the writer say nothing
        self.file = open(os.devnull, "w") if quiet else (file if file is not None else sys.stderr)  # noqa: SIM115
        self.bar = tqdm(total=self.total, desc=name, unit="step", disable=None, file=self.file,
                        dynamic_ncols=True)
        self.lines = bool(self.bar.disable)  # off a terminal: lines instead of the bar
        self.step = self.start_step = 0
        self.t_start = self.t_line = None

    def log(self, message: str) -> None:
        """One line on the stream, above the bar when there is one."""
        if self.lines:
            print(message, file=self.file, flush=True)
        else:
            self.bar.write(message, file=self.file)

    @contextlib.contextmanager
    def phase(self, name: str, detail: str = "", *, start_line: bool = True):
        """Lines when `name` starts and ends (with its duration); the bar shows the phase from
        its start. `start_line=False`: one line at the end only, for a phase that can end in a
        usage error (setup finds an unavailable dataset), which must stay the only line."""
        what = f"{self.name}: {name}{f' ({detail})' if detail else ''}"
        self.bar.set_description(f"{self.name} [{name}]")
        if start_line:
            self.log(f"{what} ...")
        t = time.time()
        try:
            yield
        except BaseException:
            self.bar.leave = False  # a failed phase leaves no bar behind, only its error
            raise
        self.log(f"{f'{self.name}: {name}' if start_line else what} done in {time.time() - t:.1f}s")
        self.bar.set_description(self.name)

    def start(self, step: int) -> None:
        """Training begins (or resumes) at `step`; rates count from now."""
        self.step = self.start_step = int(step)
        self.bar.reset()  # the bar's clock and rate count from here too
        self.bar.initial = self.bar.n = self.bar.last_print_n = self.step
        self.bar.refresh()
        self.t_start = time.time()

    def rate(self) -> float | None:
        """Steps per second since `start`."""
        elapsed = time.time() - self.t_start if self.t_start is not None else 0.0
        return (self.step - self.start_step) / elapsed if elapsed > 0 and self.step > self.start_step else None

    def update(self, step: int, loss: float | None = None) -> None:
        """Steps up to `step` are done; `loss` is the latest logged training loss."""
        self.bar.update(int(step) - self.step)
        self.step = int(step)
        if loss is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        now = time.time()
        due = self.t_line is None or now - self.t_line >= self.every_s or self.step >= self.total
        if self.lines and due:
            self.t_line = now
            self.log(self.line(loss))

    def line(self, loss: float | None = None) -> str:
        """`<name>: step S/N (P%)  loss L  R steps/s  ETA T`."""
        parts = [f"{self.name}: step {self.step}/{self.total} ({100 * self.step / max(self.total, 1):.0f}%)"]
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        rate = self.rate()
        if rate:
            parts.append(f"{rate:,.0f} steps/s")
            parts.append(f"ETA {_duration((self.total - self.step) / rate)}")
        return "  ".join(parts)

    def close(self) -> None:
        self.bar.close()
