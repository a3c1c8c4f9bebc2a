"""How the extra forward passes of an S-IB step treat BatchNorm: they never update its running
statistics, and a sub-batch pass normalises with its own, the full batch's or the running ones."""
from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

#: What the sub-batch pass normalises with: the full batch's statistics of the same step
#: ("frozen"), its own images' ("batch"), or the running statistics ("running").
SUB_BATCH_NORMS = ("frozen", "batch", "running")


@contextlib.contextmanager
def frozen_norm_statistics(model: nn.Module):
    """Forward passes inside leave the running statistics of BatchNorm-like layers as they were.

    The values are written back through ``.data`` so that the graphs of earlier passes, which
    saved these buffers, stay valid (no version-counter bump) and a compiled model keeps its
    buffers' identity.
    """
    saved = []
    for module in model.modules():
        if isinstance(module, _NormBase) and module.training and module.track_running_stats:
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                buf = getattr(module, name, None)
                if buf is not None:
                    saved.append((buf, buf.detach().clone()))
    try:
        yield
    finally:
        for buf, value in saved:
            buf.data.copy_(value)


def _batch_norms(model: nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.training]


@contextlib.contextmanager
def recorded_batch_statistics(model: nn.Module, enabled: bool = True):
    """Yields a dict that the forward passes inside fill with each train-mode BatchNorm layer's
    batch mean and (biased, as BatchNorm normalises) variance, detached."""
    stats: dict = {}
    handles = []

    def record(module, args):
        x = args[0].detach()
        dims = [d for d in range(x.dim()) if d != 1]
        dtype = module.weight.dtype if module.weight is not None else torch.float32
        with torch.no_grad():
            v = x.to(torch.promote_types(x.dtype, torch.float32))
            stats[module] = (v.mean(dims).to(dtype), v.var(dims, unbiased=False).to(dtype))

    if enabled:
        handles = [m.register_forward_pre_hook(record) for m in _batch_norms(model)]
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def sub_batch_norm(model: nn.Module, mode: str, full_batch_stats: dict):
    """Forward passes inside normalise as ``mode`` says (``SUB_BATCH_NORMS``) and update nothing.

    "frozen" and "running" run the BatchNorm layers in eval mode on the given statistics (those
    recorded by ``recorded_batch_statistics`` during the full pass, or the running ones), so the
    statistics are constants of the pass; "batch" keeps train mode, each pass its own statistics.
    """
    if mode not in SUB_BATCH_NORMS:
        raise ValueError(f"sib_bn must be one of {SUB_BATCH_NORMS}, got {mode!r}")
    if mode == "batch":
        with frozen_norm_statistics(model):
            yield
        return
    layers = _batch_norms(model)
    saved = [(m, m._buffers.get("running_mean"), m._buffers.get("running_var")) for m in layers]
    try:
        for m in layers:
            if mode == "frozen":
                m._buffers["running_mean"], m._buffers["running_var"] = full_batch_stats[m]
            m.training = False
        yield
    finally:
        for m, mean, var in saved:
            m.training = True
            m._buffers["running_mean"], m._buffers["running_var"] = mean, var
