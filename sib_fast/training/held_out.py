"""The held-out pass at each ``sib-train`` epoch's end (and of ``--eval-only``): validation
accuracy (top-1, and top-5 with more than 5 classes), and on the first batches the S-IB
statistics of R and the share of |R| on the object (the ``val_*`` fields of
``metrics.jsonl``), summed over every rank."""
from __future__ import annotations

import contextlib

import torch

from sib_fast.functional import sib_terms
from sib_fast.loss import SIBLoss
from sib_fast.training.distributed import Dist
from sib_fast.vjp import input_vjp


@torch.no_grad()
def evaluate(model, loader, d: Dist, normalize, criterion: SIBLoss, amp_dtype, channels_last, saliency_batches=2,
             on_bad=lambda bad: None, num_classes: int = 0) -> dict:
    """Validation accuracy (``val_acc5``: top-5, None with 5 classes or fewer), and on the first
    batches the S-IB statistics of R (and, with masks, the fraction of |R| that falls on the
    object). ``on_bad`` gets each batch's skipped files; ``num_classes``: the model's."""
    was_training = model.training
    model.eval()
    correct = correct5 = total = 0
    hsic_sum = bg_sum = n_sal = fg_sum = area_sum = n_fg = 0.0
    autocast = (torch.autocast(d.device.type, dtype=amp_dtype) if amp_dtype is not None
                else contextlib.nullcontext())
    for i, (x, y, mask, bad) in enumerate(loader):
        on_bad(bad)
        if x is None:  # every image of the batch was unreadable
            continue
        x, y = normalize(x.to(d.device, non_blocking=True)), y.to(d.device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if i < saliency_batches and x.shape[0] >= 2:
            with torch.enable_grad():
                xg = x.detach().requires_grad_(True)
                with autocast:
                    logits = model(xg)
                R = input_vjp(logits, xg, create_graph=False).float()
            terms = sib_terms(R, x.to(R.dtype), window_size=criterion.window_size, temperature=criterion.temperature,
                              slope=criterion.slope, backend=criterion.backend)
            hsic_sum += float(terms.hsic) * x.shape[0]
            bg_sum += float(terms.bg) * x.shape[0]
            n_sal += x.shape[0]
            if mask is not None:
                mask = mask.to(d.device).flatten(1)
                sal = R.abs().sum(dim=1).flatten(1)
                fg_sum += float((sal * mask).sum(1).div(sal.sum(1).clamp_min(1e-30)).sum())
                area_sum += float(mask.mean(1).sum())
                n_fg += x.shape[0]
        else:
            with autocast:
                logits = model(x)
        correct += int((logits.argmax(1) == y).sum())
        correct5 += top5_correct(logits, y)
        total += x.shape[0]
    correct, correct5, total, hsic_sum, bg_sum, n_sal, fg_sum, area_sum, n_fg = d.sum(
        [correct, correct5, total, hsic_sum, bg_sum, n_sal, fg_sum, area_sum, n_fg])
    model.train(was_training)
    return dict(val_acc=correct / max(total, 1),
                val_acc5=correct5 / max(total, 1) if num_classes > 5 else None,
                val_hsic=hsic_sum / n_sal if n_sal else None, val_bg=bg_sum / n_sal if n_sal else None,
                val_fg_fraction=fg_sum / n_fg if n_fg else None, val_fg_area=area_sum / n_fg if n_fg else None)


def top5_correct(logits: torch.Tensor, y: torch.Tensor) -> int:
    """How many of ``y`` are among the 5 highest logits (0 with 5 classes or fewer: not reported)."""
    if logits.shape[1] <= 5:
        return 0
    return int((logits.topk(5, dim=1).indices == y[:, None]).any(1).sum())
