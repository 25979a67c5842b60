"""A training run as the command line shows it: a progress bar with the loss, an early time estimate, a
checkpoint on Ctrl-C. ``starflow train`` and its ``--lora`` form both run through here."""

from __future__ import annotations

import time
from dataclasses import dataclass

import typer

RATE_STEPS = (2, 6)  # the time estimate divides the time between these steps of a run (the first compiles)


@dataclass
class TrainingRun:
    first: int  # the step training started from (a resumed run's saved step)
    seconds: float
    first_done: float | None  # when the first step ended: it also traces the graph and may build kernels
    end: float

    def summary(self, trainer) -> str:
        ran = trainer.step - self.first
        resumed = f" (steps {self.first + 1} to {trainer.step}; {trainer.seconds / 60:.1f} min in all)" if self.first else ""
        rate = f"{self.seconds / max(ran, 1):.2f} s/step"
        if ran > 1:  # what more steps would cost, without the first step's one-off compilation
            rate += f"; {(self.end - self.first_done) / (ran - 1):.2f} s/step after the first"
        return f"{ran} steps{resumed} in {self.seconds / 60:.1f} min ({rate})"

    @staticmethod
    def peak_gb() -> float:
        import mlx.core as mx

        return mx.get_peak_memory() / 2**30


def run_with_progress(trainer, steps: int) -> TrainingRun:
    """Run ``trainer`` to ``steps`` with a progress bar showing the loss and bits/dim, a time estimate early on,
    and a checkpoint on Ctrl-C."""
    from starflow_mlx.progress import StageProgress, about
    from starflow_mlx.training.trainer import bits_per_dim

    first, start = trainer.step, time.perf_counter()
    first_done = None
    timed = {}  # when steps first + 2 and first + 6 ended: the rate is measured between them, past the warm-up

    def on_step(step: int, loss: float) -> None:
        nonlocal first_done
        now = time.perf_counter()
        first_done = first_done or now
        if step - first in RATE_STEPS:
            timed[step - first] = now
        if step - first == RATE_STEPS[1] and step < steps:  # early, and past the first steps' warm-up
            rate = (now - timed[RATE_STEPS[0]]) / (RATE_STEPS[1] - RATE_STEPS[0])
            stages.log(f"training: {about(rate * (steps - step))} for the {steps - step} steps left "
                       f"({rate:.2f} s/step here); Ctrl-C saves a checkpoint to --resume from")
        stages("training", step, steps, note=f"loss {loss:.4f}  {bits_per_dim(loss):.3f} bits/dim")

    with StageProgress() as stages:
        stages("training", first, steps)
        try:
            trainer.run(on_step=on_step)
        except KeyboardInterrupt:
            every = trainer.train.checkpoint_every
            saved = f": checkpoint at step {trainer.saved_step}, continue with --resume" if every else ""
            typer.echo(f"error: interrupted at step {trainer.step}{saved}", err=True)
            raise typer.Exit(130) from None
    end = time.perf_counter()
    return TrainingRun(first, end - start, first_done, end)
