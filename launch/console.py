"""What the trainer tells the user on rank 0's stdout: a progress bar on a terminal, plain lines elsewhere.

tqdm redraws its bar with carriage returns; in a file (a pipe, a Slurm output file) every redraw stays,
and the log becomes one huge line. So the bar is drawn only when stdout is a terminal and
``trainer.progress`` is true. Otherwise, rank 0 prints one line every ``trainer.log_interval`` steps
(and at the last step), with the throughput over the steps since the previous line, the same window
as TensorBoard's ``train/tokens_per_s``:

    step 20/200 | loss 4.1234 | lr 6.000e-04 | 12,345 tokens/s

``trainer.progress: false`` turns the bar off on a terminal too, and the lines take its place: per-step
output is never switched off altogether. Messages (an evaluation, a checkpoint saved, a resume) are
printed in either mode; with a bar, above it (tqdm.write), so that the bar stays one line.

Other ranks print nothing here: every rank holds the same figures after the step's all-reduce.
"""

from __future__ import annotations

import sys


class Console:
    """Rank 0's messages, progress bar and per-step lines; a no-op on the other ranks."""

    def __init__(self, rank: int, progress: bool) -> None:
        self.active = rank == 0
        self.wants_bar = self.active and progress and sys.stdout.isatty()
        self.bar = None  # tqdm, from start() while the loop runs, when wants_bar

    def say(self, text: str) -> None:
        """One message line (rank 0)."""
        if not self.active:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stdout)
        else:
            print(text, flush=True)

    def start(self, step: int, total: int) -> None:
        """The loop begins at ``step`` of ``total``: open the bar if there is one."""
        if self.wants_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=step, unit="step", dynamic_ncols=True, file=sys.stdout)

    def step(self, step: int, total: int, loss: float, lr: float, tokens_per_s: float | None,
             overall_tokens_per_s: float) -> None:
        """After each step: advance the bar; without one, print the step's line when ``tokens_per_s`` is
        given (a log step: the rate over the steps since the last one)."""
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{overall_tokens_per_s:,.0f}",
                                 refresh=False)
            self.bar.update(1)
        elif tokens_per_s is not None:
            self.say(f"step {step}/{total} | loss {loss:.4f} | lr {lr:.3e} | {tokens_per_s:,.0f} tokens/s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
