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
    batch mean and (biased, as BatchNorm normalises) variance, detached; the last call's for a
    layer called more than once.

    A layer that keeps running statistics has just folded the batch's into them, so they are read
    back from that update, r' = (1 - f) r + f s (f: the momentum, or 1 / batches tracked; the
    variance unbiased), at the cost of a few per-channel operations instead of a pass over the
    activations; a layer without running statistics is measured.
    """
    stats: dict = {}
    before: dict = {}
    handles = []

    def keep(module, args):
        if module.track_running_stats:
            before[module] = (module.running_mean.detach().clone(), module.running_var.detach().clone())
            return
        x = args[0].detach()
        with torch.no_grad():  # one pass over the activations
            var, mean = torch.var_mean(x.to(torch.promote_types(x.dtype, torch.float32)),
                                       [d for d in range(x.dim()) if d != 1], unbiased=False)
            stats[module] = (mean.to(module.running_mean.dtype if module.running_mean is not None else x.dtype),
                             var.to(mean.dtype))

    def read_back(module, args, output):
        if not module.track_running_stats:
            return
        old_mean, old_var = before.pop(module)
        f = 1.0 / float(module.num_batches_tracked) if module.momentum is None else module.momentum
        n = args[0].numel() // args[0].shape[1]
        with torch.no_grad():
            mean = (module.running_mean - (1 - f) * old_mean) / f
            unbiased = (module.running_var - (1 - f) * old_var) / f
            stats[module] = (mean, unbiased * ((n - 1) / n))

    if enabled:
        for m in _batch_norms(model):
            handles += [m.register_forward_pre_hook(keep), m.register_forward_hook(read_back)]
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
