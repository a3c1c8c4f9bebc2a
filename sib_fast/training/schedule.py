"""The learning-rate schedules of ``sib-train`` (``--lr-schedule``, ``--warmup-epochs``,
``--lr-step-epochs``, ``--lr-gamma``), set at every step rather than every epoch: an ImageNet epoch
is thousands of steps, and a warmup of a fraction of an epoch is common.

The rate of a step is a function of its position in the run (epoch x steps per epoch + batch) and
the arguments only, so a resumed run, even from the middle of an epoch, takes the rate the
uninterrupted one took; nothing else needs saving (the checkpoint records the schedule anyway).

- ``constant``: ``--lr`` (the authors' setting);
- ``cosine``: from ``--lr`` after the warmup down to 0 at the end of ``--epochs``, half a cosine;
- ``step``: ``--lr`` times ``--lr-gamma`` at each of the ``--lr-step-epochs`` milestones (epochs,
  fractions allowed; default a third and two thirds of ``--epochs``: 30 and 60 of ImageNet's 90).

``--warmup-epochs W`` (fractions allowed) ramps the rate linearly over the first ``W`` epochs'
steps, from ``--lr / warmup steps`` at the first step to ``--lr`` at the last, under every schedule.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULES = ("constant", "cosine", "step")
DEFAULT_GAMMA = 0.1


def default_milestones(epochs: int) -> list[float]:
    """A third and two thirds of the run, in epochs (ImageNet's 30 and 60 of 90)."""
    return [epochs / 3, 2 * epochs / 3]


def parse_milestones(text: str) -> list[float]:
    """``"30,60"`` -> ``[30.0, 60.0]``; ValueError naming the bad entry."""
    out = []
    for part in text.split(","):
        try:
            out.append(float(part))
        except ValueError:
            raise ValueError(f"--lr-step-epochs must be comma-separated epochs (e.g. 30,60), got {part.strip()!r}") \
                from None
    return out


@dataclass(frozen=True)
class Schedule:
    """The rate of each step of a run of ``epochs`` epochs of ``steps_per_epoch`` steps."""
    name: str
    base_lr: float
    steps_per_epoch: int
    epochs: int
    warmup_epochs: float = 0.0
    milestones: tuple[float, ...] = ()
    gamma: float = DEFAULT_GAMMA

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def warmup_steps(self) -> int:
        return round(self.warmup_epochs * self.steps_per_epoch)

    def milestone_steps(self) -> list[int]:
        return [round(m * self.steps_per_epoch) for m in self.milestones]

    def lr(self, position: int) -> float:
        """The learning rate of the step at ``position`` (0-based: epoch * steps_per_epoch + batch)."""
        warm = self.warmup_steps
        if position < warm:
            return self.base_lr * (position + 1) / warm
        if self.name == "cosine":
            span = max(self.total_steps - warm, 1)
            return self.base_lr * 0.5 * (1 + math.cos(math.pi * min(position - warm, span) / span))
        if self.name == "step":
            return self.base_lr * self.gamma ** sum(position >= s for s in self.milestone_steps())
        return self.base_lr

    def record(self) -> dict:
        """What the checkpoint keeps of it (for the record: the rate follows from the position)."""
        return dict(name=self.name, base_lr=self.base_lr, steps_per_epoch=self.steps_per_epoch, epochs=self.epochs,
                    warmup_steps=self.warmup_steps, milestone_steps=self.milestone_steps(), gamma=self.gamma)


def from_args(args, steps_per_epoch: int) -> Schedule:
    """The schedule of validated ``sib-train`` arguments."""
    return Schedule(args.lr_schedule, args.lr, steps_per_epoch, args.epochs, args.warmup_epochs,
                    tuple(args.lr_step_epochs or ()), args.lr_gamma if args.lr_gamma is not None else DEFAULT_GAMMA)


def check(args) -> None:
    """Check and complete the schedule arguments; ValueError with one line."""
    w = args.warmup_epochs
    if not (math.isfinite(w) and w >= 0):
        raise ValueError(f"--warmup-epochs must be a finite number >= 0, got {w}")
    if w >= args.epochs:
        raise ValueError(f"--warmup-epochs ({w:g}) must be less than --epochs ({args.epochs})")
    if args.lr_schedule != "step":
        if args.lr_step_epochs is not None or args.lr_gamma is not None:
            raise ValueError("--lr-step-epochs and --lr-gamma apply to --lr-schedule step only")
        return
    if args.lr_gamma is None:
        args.lr_gamma = DEFAULT_GAMMA
    if not (math.isfinite(args.lr_gamma) and 0 < args.lr_gamma < 1):
        raise ValueError(f"--lr-gamma must be in (0, 1), got {args.lr_gamma}")
    if isinstance(args.lr_step_epochs, str):
        args.lr_step_epochs = parse_milestones(args.lr_step_epochs)
    if args.lr_step_epochs is None:
        args.lr_step_epochs = default_milestones(args.epochs)
    ms = args.lr_step_epochs
    if not ms:
        raise ValueError("--lr-step-epochs is empty")
    bad = [m for m in ms if not (math.isfinite(m) and w <= m < args.epochs and m > 0)]
    if bad:
        raise ValueError(f"--lr-step-epochs: each milestone must be after the warmup ({w:g}) and before --epochs "
                         f"({args.epochs}), got {bad[0]:g}")
    if any(b <= a for a, b in zip(ms, ms[1:])):
        raise ValueError(f"--lr-step-epochs must increase, got {','.join(f'{m:g}' for m in ms)}")
