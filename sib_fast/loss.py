"""``SIBLoss``: cross-entropy plus the S-IB head, a drop-in training loss."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sib_fast.backends.dispatch import BACKEND_NAMES, resolve_backend
from sib_fast.functional import sib_terms
from sib_fast.validation import MAX_PROJECTION_SEED, check_hsic_features, check_hyperparameters
from sib_fast.vjp import input_vjp


class SIBLoss(nn.Module):
    """loss = CE(logits, target) + lambda_bg * exp(BG) + lambda_fg * exp(-HSIC)  (docs/loss.md section 6).

    ``forward(logits, target, x)`` computes R = d phi/dx itself (double
    backward, the paper's exact mode), so ``x`` must require grad and
    ``logits`` must be computed from it. The head sees ``x`` detached: the
    weights' gradient is unchanged (x does not depend on them) and the fused
    backward then skips writing d loss/dx.

    After each call, ``ce``, ``hsic``, ``bg`` and ``loss`` hold detached
    0-dim tensors for logging (no device sync), and ``backend_used`` the name
    of the backend that ran.

    ``hsic_features=F`` takes the random-feature HSIC_F of docs/loss.md section 4b instead of
    the HSIC (the authors' ``hsic_rand_feat``; their README suggests 512): every call draws a
    new projection seed from torch's default (CPU) generator, so a run is reproducible under
    ``torch.manual_seed``, and keeps it in ``projection_seed``.
    """

    def __init__(self, lambda_fg: float = 0.01, lambda_bg: float = 1000.0, window_size: int = 31,
                 temperature: float = 0.1, slope: float = 10.0, backend: str = "auto",
                 hsic_features: int | None = None):
        super().__init__()
        check_hyperparameters(window_size, temperature, slope)
        check_hsic_features(hsic_features)
        for name, value in (("lambda_fg", lambda_fg), ("lambda_bg", lambda_bg)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if backend not in BACKEND_NAMES + ("auto",):
            raise ValueError(f"backend must be one of {BACKEND_NAMES + ('auto',)}, got {backend!r}")
        self.lambda_fg = float(lambda_fg)
        self.lambda_bg = float(lambda_bg)
        self.window_size = int(window_size)
        self.temperature = float(temperature)
        self.slope = float(slope)
        self.backend = backend
        self.hsic_features = None if hsic_features is None else int(hsic_features)
        self.projection_seed: int | None = None
        self.ce = self.hsic = self.bg = self.loss = None
        self.backend_used: str | None = None

    def extra_repr(self) -> str:
        return (f"lambda_fg={self.lambda_fg}, lambda_bg={self.lambda_bg}, window_size={self.window_size}, "
                f"temperature={self.temperature}, slope={self.slope}, backend={self.backend!r}"
                + (f", hsic_features={self.hsic_features}" if self.hsic_features is not None else ""))

    def forward(self, logits: torch.Tensor, target: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        R = input_vjp(logits, x, create_graph=True)
        return self.loss_from_vjp(logits, target, x, R)

    def loss_from_vjp(self, logits: torch.Tensor, target: torch.Tensor, x: torch.Tensor,
                      R: torch.Tensor) -> torch.Tensor:
        """The loss for an R computed elsewhere (the finite-difference training mode uses this)."""
        head = self.head_loss(R, x)
        ce = F.cross_entropy(logits, target)
        loss = ce + head
        self.ce, self.loss = ce.detach(), loss.detach()
        return loss

    def head_loss(self, R: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The S-IB terms alone, lambda_bg * exp(BG) + lambda_fg * exp(-HSIC), of R and x; keeps
        ``hsic``, ``bg`` and ``backend_used`` (training steps that take CE on other images use this)."""
        fg, bg = self.weighted_terms(R, x)
        return bg + fg

    def weighted_terms(self, R: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lambda_fg * exp(-HSIC), lambda_bg * exp(BG))`` of R and x, each 0-dim; keeps ``hsic``,
        ``bg`` and ``backend_used``."""
        projection = self.hsic_features is not None
        self.backend_used = resolve_backend(R.device, self.backend, self.temperature,
                                            torch.promote_types(R.dtype, x.dtype), projection=projection)
        # a fresh W per call, from the default generator (reproducible under torch.manual_seed)
        self.projection_seed = int(torch.randint(MAX_PROJECTION_SEED, (), device="cpu").item()) if projection else None
        terms = sib_terms(R, x.detach(), window_size=self.window_size, temperature=self.temperature,
                          slope=self.slope, backend=self.backend_used, hsic_features=self.hsic_features,
                          projection_seed=self.projection_seed)
        self.hsic, self.bg = terms.hsic.detach(), terms.bg.detach()
        return self.lambda_fg * torch.exp(-terms.hsic), self.lambda_bg * torch.exp(terms.bg)
