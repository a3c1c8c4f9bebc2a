"""Backend selection: which implementation of the S-IB head runs, and why.

Backends:
  ``reference``  plain PyTorch (``sib_fast.backends.reference``), any device, always there;
  ``cpu``        fused C++ kernels of the extension ``sib_fast._C`` on CPU tensors;
  ``cuda``       fused C++/CUDA kernels of the same extension on CUDA tensors;
  ``triton``     fused Triton kernels on CUDA tensors (CPU tensors too under
                 ``TRITON_INTERPRET=1``, Triton's interpreter, for testing).

``auto`` takes the fastest backend available for the tensors' device. It falls
back to ``reference`` only with a one-time warning saying why the fused ones
are unavailable (or inexact at the temperature asked for); a backend asked for
by name either runs or raises.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import math
import os
import warnings

import torch

from sib_fast.backends.constants import RANK_WINDOW, RANKS_BELOW

log = logging.getLogger("sib_fast")

BACKEND_NAMES = ("reference", "cpu", "cuda", "triton")

# Preference per device type. On CUDA the order is not measured yet (no GPU run so far):
# `benchmarks/gpu_check.sh` times both; put the faster first (issue: "auto" picks it).
_AUTO_ORDER = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}

_BACKEND_MODULES = {
    "reference": "sib_fast.backends.reference",
    "cpu": "sib_fast.backends.extension",
    "cuda": "sib_fast.backends.extension",
    "triton": "sib_fast.backends.triton.ops",
}

_FUSED_OP = "sib_fast::sib_head_forward"
_PROJECTION_OP = "sib_fast::masked_projection_forward"  # the random-feature HSIC's (docs/loss.md section 4b)

_LOADED: dict = {}  # backend name -> its imported module


class BackendUnavailableError(RuntimeError):
    """A backend asked for by name cannot run on this machine or device."""


@functools.lru_cache(maxsize=None)
def extension_status() -> str | None:
    """None if the compiled extension ``sib_fast._C`` loaded, else why not."""
    try:  # the ops together with their autograd and fake kernels
        importlib.import_module("sib_fast.backends.extension")
    except ImportError as exc:
        return (f"the compiled extension sib_fast._C is not built ({exc}); "
                "build it with `pip install --no-build-isolation -e .`")
    return None


def _has_kernel(dispatch_key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(_FUSED_OP, dispatch_key)


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(backend: str, device_type: str) -> str | None:
    """None if ``backend`` can run on tensors of ``device_type``, else a reason."""
    if backend == "reference":
        return None
    if backend in ("cpu", "cuda"):
        if device_type != backend:
            return f"the '{backend}' backend runs on {backend} tensors, not {device_type} tensors"
        if backend == "cuda" and not torch.cuda.is_available():
            return "no CUDA GPU is available"
        reason = extension_status()
        if reason is not None:
            return reason
        key = "CPU" if backend == "cpu" else "CUDA"
        if not _has_kernel(key):
            return f"sib_fast._C was built without {key} kernels for {_FUSED_OP}"
        return None
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            return "Triton is not installed (pip install triton)"
        if importlib.util.find_spec("sib_fast.backends.triton.ops") is None:
            return "the Triton backend is not part of this version of sib_fast"
        if device_type == "cuda":
            return None if torch.cuda.is_available() else "no CUDA GPU is available"
        if device_type == "cpu" and _triton_interpreted():
            return None
        return f"the 'triton' backend runs on CUDA tensors (CPU tensors only with TRITON_INTERPRET=1), not {device_type}"
    raise ValueError(f"backend must be one of {BACKEND_NAMES + ('auto',)}, got {backend!r}")


def projection_unavailable_reason(backend: str, device_type: str) -> str | None:
    """None if ``backend`` (able to run on ``device_type``) has the random-feature HSIC's fused
    projection (``hsic_features``), else why not."""
    if backend == "reference":
        return None
    if backend in ("cpu", "cuda"):
        key = "CPU" if backend == "cpu" else "CUDA"
        try:
            has = torch._C._dispatch_has_kernel_for_dispatch_key(_PROJECTION_OP, key)
        except RuntimeError:  # an extension built before the op existed
            has = False
        return None if has else f"sib_fast._C has no {key} kernel for {_PROJECTION_OP} (hsic_features)"
    module = importlib.import_module(_BACKEND_MODULES[backend])
    if not hasattr(module, "projected_terms"):
        return f"the '{backend}' backend has no projected_terms (hsic_features) in this version of sib_fast"
    return None


def fused_temperature_limit(dtype: torch.dtype) -> float:
    """The largest soft-quantile temperature at which the fused backends are exact in ``dtype``.

    They read only the 18 ranks floor(t) - 8 .. floor(t) + 9 around each quantile's position t
    (docs/loss.md section 2 allows it for T = 0.1). The nearest rank left out lies at least 9 ranks
    beyond the nearest one kept, so it weighs at most exp(-9 / T) of it: below the rounding of
    the compute dtype (2^-24 in float32, which half-precision inputs use too; 2^-53 in
    float64) while T <= 9 / (p ln 2), 0.541 and 0.245. Beyond, the fused result drifts from
    the function (dR off by 1e-4 at T = 1, 1e-2 at T = 2), so they refuse to run there.
    """
    bits = 53 if dtype == torch.float64 else 24
    # the nearest rank left out, below or above the window, is this many ranks from t at least
    gap = min(RANKS_BELOW + 1, RANK_WINDOW - RANKS_BELOW)
    return gap / (bits * math.log(2.0))


def _temperature_reason(backend: str, temperature: float, dtype: torch.dtype) -> str | None:
    if backend == "reference" or temperature <= fused_temperature_limit(dtype):
        return None
    compute = "float64" if dtype == torch.float64 else "float32"
    return (f"temperature={temperature:g} is above {fused_temperature_limit(dtype):.3f}, the largest at which "
            f"the fused backends compute the soft quantiles exactly in {compute} (they read {RANK_WINDOW} ranks around "
            f"each quantile; docs/loss.md section 2)")


def available_backends(device=None) -> list[str]:
    """Backends that can run here; for one device type if ``device`` is given."""
    if device is not None:
        device_types = [torch.device(device).type]
    else:
        device_types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [name for name in BACKEND_NAMES
            if any(unavailable_reason(name, dt) is None for dt in device_types)]


@functools.lru_cache(maxsize=None)
def _warn_once(note: str) -> None:
    warnings.warn(f"sib_fast: {note}", RuntimeWarning, stacklevel=4)


def _constant_under_compile(fn):
    # What torch.compiler.assume_constant_result does (torch 2.11-2.14), without importing
    # torch._dynamo, which would add about 3 s to `import sib_fast`. The fullgraph test in
    # tests/test_cpu_backend.py fails if a torch release changes the mechanism.
    fn._dynamo_marked_constant = True
    return fn


def backend_choice(device, backend: str = "auto", temperature: float = 0.1, dtype: torch.dtype = torch.float32,
                   projection: bool = False) -> tuple[str, str | None]:
    """``resolve_backend``'s choice and, when 'auto' falls back to 'reference', the note saying why
    (None otherwise); warns nothing and loads nothing, so that a caller such as sib-train can log
    the note on every run of a process."""
    device_type = torch.device(device).type
    name, reasons = _choose_backend(device, backend, projection)
    note = None
    if reasons is not None:
        note = (f"backend='auto' runs the plain-PyTorch 'reference' backend on {device_type} tensors because no "
                f"fused backend is available: {reasons}")
    reason = _temperature_reason(name, temperature, dtype)
    if reason is not None:
        if backend != "auto":
            raise ValueError(f"backend '{backend}': {reason}; use backend='reference' (or 'auto', "
                             f"which falls back to it)")
        note = f"backend='auto' runs the plain-PyTorch 'reference' backend on {device_type} tensors because {reason}"
        name = "reference"
    return name, note


# Under torch.compile the choice is made once, eagerly, at trace time and baked in.
@_constant_under_compile
def resolve_backend(device, backend: str = "auto", temperature: float = 0.1,
                    dtype: torch.dtype = torch.float32, projection: bool = False) -> str:
    """The name of the backend that will run for tensors on ``device``, at this soft-quantile
    temperature, for inputs of ``dtype`` (see ``fused_temperature_limit``); with ``projection``,
    one that also has the random-feature HSIC's fused projection (``hsic_features``). A fallback
    of 'auto' to 'reference' warns once per process and reason (``backend_choice`` says why).

    It also imports that backend's module, so that ``backend_module`` is a
    plain lookup (traceable by torch.compile).
    """
    name, note = backend_choice(device, backend, temperature, dtype, projection)
    if note is not None:
        _warn_once(note)
    if name not in _LOADED:
        _LOADED[name] = importlib.import_module(_BACKEND_MODULES[name])
        log.info("sib_fast: backend %r runs for %s tensors (asked for %r)", name, torch.device(device).type, backend)
    return name


def _choose_backend(device, backend: str, projection: bool = False) -> tuple[str, str | None]:
    """The backend for ``device`` and, when 'auto' finds no fused one, why each could not run."""
    if not isinstance(backend, str) or backend not in BACKEND_NAMES + ("auto",):
        raise ValueError(f"backend must be one of {BACKEND_NAMES + ('auto',)}, got {backend!r}")
    device_type = torch.device(device).type

    def reason_for(name):
        reason = unavailable_reason(name, device_type)
        return reason if reason is not None or not projection else projection_unavailable_reason(name, device_type)

    if backend != "auto":
        reason = reason_for(backend)
        if reason is not None:
            raise BackendUnavailableError(f"backend '{backend}' is unavailable: {reason}")
        return backend, None
    reasons = []
    for name in _AUTO_ORDER.get(device_type, ()):
        reason = reason_for(name)
        if reason is None:
            return name, None
        reasons.append(f"{name}: {reason}")
    return "reference", "; ".join(reasons) or f"none exists for {device_type} tensors"


def backend_module(name: str):
    """The module implementing backend ``name`` (``sib_terms`` and ``spatial_mask``),
    once ``resolve_backend`` has chosen it."""
    return _LOADED[name]


# Load the compiled ops, if built, at `import sib_fast`: torch.ops.sib_fast.* then come with
# their autograd and fake kernels whichever way they are reached.
extension_status()
