"""sib_fast: the Spatial Information Bottleneck (S-IB) loss, fused.

Public API (see README.md): ``input_vjp``, ``spatial_mask``, ``sib_terms``,
``SIBTerms``, ``SIBLoss``, ``available_backends``, ``resolve_backend``,
``sib_backward`` (one training step, exact or finite-difference VJP mode; with
``separate_step_compensation`` for S-IB's own lazy optimizer step), ``vjp_agreement``
(how closely the two modes agree on a model), ``gradient_shares`` (how hard each S-IB term pulls on
the weights).
"""
from sib_fast.backends.dispatch import BackendUnavailableError, available_backends, resolve_backend
from sib_fast.functional import SIBTerms, sib_terms, spatial_mask
from sib_fast.loss import SIBLoss
from sib_fast.training.shares import GradientShares, gradient_shares
from sib_fast.training.step import separate_step_compensation, sib_backward, vjp_agreement
from sib_fast.vjp import input_vjp

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError", "GradientShares", "SIBLoss", "SIBTerms", "available_backends", "gradient_shares",
    "input_vjp",
    "resolve_backend", "separate_step_compensation", "sib_backward", "sib_terms", "spatial_mask", "vjp_agreement",
]
