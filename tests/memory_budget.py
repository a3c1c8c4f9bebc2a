"""The head's memory target (issues #3-#5): forward and backward together allocate at most
1.5x the size of R, dR included, for float32 maps with three channels."""
from __future__ import annotations

import torch

import sib_fast
from sib_fast.bench.measure import peak_extra_memory

EXTRA_MEMORY_BUDGET = 1.5  # times R's bytes


def check_head_memory_budget(backend, R, x):
    """Runs forward and backward of ``backend`` on R, x (R a leaf) and checks the peak memory
    allocated meanwhile against the budget; returns the peak as a multiple of R's bytes."""
    R = R.detach().requires_grad_()
    upstream = (torch.tensor(0.7, device=R.device), torch.tensor(0.3, device=R.device))

    def forward_backward():
        hsic, bg, _ = sib_fast.sib_terms(R, x, window_size=5, backend=backend)
        return torch.autograd.grad((hsic, bg), (R,), upstream)[0]

    forward_backward()  # caches (rank weight tables) are not the head's memory
    peak = peak_extra_memory(forward_backward, R.device)
    assert peak["bytes"] is not None, "no memory measurement on this machine"
    ratio = peak["bytes"] / (R.numel() * R.element_size())
    assert ratio <= EXTRA_MEMORY_BUDGET, (
        f"{backend}: forward + backward allocated {ratio:.2f}x the size of R ({peak['method']}), "
        f"more than the {EXTRA_MEMORY_BUDGET}x budget")
    return ratio
