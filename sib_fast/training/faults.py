"""What stops or thins a ``sib-train`` run, each said in one line: ``TrainingStopped``, the
unreadable image files that are skipped (counted over every rank), and the likely cause of a run
of non-finite losses."""
from __future__ import annotations

import math

import torch
from torch import nn

from sib_fast.training import PROG
from sib_fast.training.distributed import Dist


class TrainingStopped(Exception):
    """The run cannot go on (non-finite losses, a model without double backward...): one line, status 1."""


class BadImages:
    """Unreadable image files met so far (path -> reason), named once each on the main process and
    merged over the ranks at each epoch's end; ``total`` counts them over every rank."""

    def __init__(self, d: Dist, log, known: dict | None = None):
        self.d = d
        self.known = dict(known or {})
        self.warned = set(self.known)        # a resumed run named these already
        self.epoch_new: dict = {}            # this rank, this epoch
        self.total = len(self.known)         # all ranks
        self.pending = 0                     # this rank's new ones since the last count
        self.write = log
        self.saved_epoch = 0                 # the epoch of checkpoint.pt, for the message that stops the run

    def note(self, bad) -> None:
        for path, reason in bad:
            if path in self.known:
                continue
            self.known[path] = self.epoch_new[path] = reason
            self.pending += 1
            if self.d.main:
                self.warn(path, reason)

    def warn(self, path, reason) -> None:
        self.warned.add(path)
        self.write(f"{PROG}: warning: skipped unreadable image {path} ({reason})")

    def merge(self) -> list[str]:
        """At an epoch's end: every rank's new files; returns them sorted (for metrics.jsonl)."""
        new = {}
        for files in self.d.gather(self.epoch_new):
            new.update(files)
        for path, reason in new.items():
            self.known.setdefault(path, reason)
            if self.d.main and path not in self.warned:
                self.warn(path, reason)
        self.epoch_new, self.pending, self.total = {}, 0, len(self.known)
        return sorted(new)

    def check(self, limit: int) -> None:
        if self.total <= limit:
            return
        # every rank gets here at the same step: the count is a sum over ranks
        names = sorted(set().union(*self.d.gather(sorted(self.known))))
        shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
        kept = f"; the checkpoint of epoch {self.saved_epoch} is intact" if self.saved_epoch else ""
        raise TrainingStopped(f"{self.total} unreadable image files in --data, more than --max-bad-images {limit}: "
                              f"{shown}; repair or remove them (or raise --max-bad-images){kept}")


def weights_finite(model: nn.Module) -> bool:
    tensors = [t for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def nonfinite_cause(args, last: dict) -> str:
    """The likely cause of the last non-finite step, from its loss terms and inputs, as advice."""
    if not last.get("input_finite", True):
        return "the input batch holds NaN/Inf values: check the data"
    if args.amp == "fp16":
        return "float16 overflow: try --amp bf16 or --amp off"
    if not last.get("weights_finite", True) or not math.isfinite(last.get("ce", 0.0)):
        return f"the network diverged (the cross-entropy is not finite): lower --lr (now {args.lr:g})"
    if not (math.isfinite(last.get("hsic", 0.0)) and math.isfinite(last.get("bg", 0.0))):
        return "the S-IB head is not finite: R overflowed; lower --lr or check the model's output scale"
    if not math.isfinite(last.get("loss", 0.0)):
        return f"exp(BG) overflowed: lower --lambda-bg (now {args.lambda_bg:g}) or --lr"
    return f"the gradient is not finite: lower --lr (now {args.lr:g})"
