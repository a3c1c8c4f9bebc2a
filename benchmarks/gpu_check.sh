#!/usr/bin/env bash
# One call on a fresh GPU machine (no internet): build the extension, run the GPU tests, then
# sib-bench head and step modes, within GPU_CHECK_BUDGET seconds (default 460, under 8 minutes).
#
#   bash benchmarks/gpu_check.sh            # results in $OUT (or runs/gpu_check when OUT is unset)
#
# Every stage has a time cap and leaves time for the stages after it; a stage that runs out is
# interrupted (SIGINT: sib-bench then saves the rows it finished) and the script goes on.
# Stages in order: build, each backend's tests, memcheck, head float32 (B=128 first), step,
# racecheck, head bfloat16, the random-feature projections (Triton, CUDA), Triton plan variants;
# the later ones get what time is left.
# Results: results.md (the tables, with date, GPU, driver and commit: paste into
# benchmarks/RESULTS.md), head_*.json / step.json / triton_plans.json (every number),
# head_float32.png (plot), <stage>.log for each stage, SUMMARY.txt (stage, exit status, seconds).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-$PWD/runs/gpu_check}"
mkdir -p "$OUT"
BUDGET="${GPU_CHECK_BUDGET:-460}"
PY="${PYTHON:-$(command -v python || command -v python3)}"
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/sib_fast_inductor_cache}"
export PYTHONUNBUFFERED=1
START=$SECONDS
FAILED=0
: > "$OUT/SUMMARY.txt"

log() { echo "[gpu_check +$((SECONDS - START))s] $*" | tee -a "$OUT/gpu_check.log"; }

# stage NAME CAP RESERVE CMD...: run CMD for at most CAP seconds, leaving RESERVE seconds of the budget
stage() {
  local name=$1 cap=$2 reserve=$3
  shift 3
  local left=$((BUDGET - (SECONDS - START) - reserve))
  local limit=$((cap < left ? cap : left))
  if [ "$limit" -lt 10 ]; then
    log "skip $name: no time left"
    echo "$name skipped 0" >> "$OUT/SUMMARY.txt"
    return 0
  fi
  log "start $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout --signal=INT --kill-after=20 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  log "end $name: exit $rc after $((SECONDS - t0))s"
  echo "$name $rc $((SECONDS - t0))" >> "$OUT/SUMMARY.txt"
  tail -n 25 "$OUT/$name.log"
  # pytest exit 5: nothing collected (e.g. no GPU tests yet): not a failure
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; then FAILED=1; fi
  return 0
}

# ---- environment
{
  nvidia-smi || true
  "$PY" -c 'import sys, torch; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)'
  "$PY" -c 'import triton; print("triton", triton.__version__)' || true
  command -v nvcc && nvcc --version | tail -n 2
  git log -1 --format='commit %H %s' || true
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# ---- build (CUDA kernels for this GPU only: half the nvcc time of the default 80;90)
if [ -z "${CUDA_HOME:-}" ]; then
  if [ -x /usr/local/cuda/bin/nvcc ]; then
    CUDA_HOME=/usr/local/cuda
  elif command -v nvcc > /dev/null; then
    # the toolkit root holds bin/nvcc and lib64/libcudart (a wrapper script in /usr/local/bin does not)
    candidate="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"
    if ls "$candidate"/lib*/libcudart.so* > /dev/null 2>&1; then CUDA_HOME="$candidate"; fi
  fi
fi
[ -n "${CUDA_HOME:-}" ] && export CUDA_HOME && export PATH="$CUDA_HOME/bin:$PATH"
if [ -z "${SIB_FAST_CUDA_ARCH:-}" ]; then
  SIB_FAST_CUDA_ARCH="$("$PY" -c 'import torch; a, b = torch.cuda.get_device_capability(); print(f"{a}{b}")' 2>/dev/null || echo "80;90")"
fi
export SIB_FAST_CUDA_ARCH MAX_JOBS="${MAX_JOBS:-16}"
log "CUDA_HOME=${CUDA_HOME:-none} SIB_FAST_CUDA_ARCH=$SIB_FAST_CUDA_ARCH"
if [ "${GPU_CHECK_SKIP_BUILD:-0}" = 1 ]; then
  log "skip build: GPU_CHECK_SKIP_BUILD=1"
else
  stage build 200 250 "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .
fi
stage backends 30 240 "$PY" -c 'import sib_fast, sib_fast.backends.dispatch as d
print("available on cuda:", sib_fast.available_backends("cuda"))
for b in ("cuda", "triton"): print(b, d.unavailable_reason(b, "cuda") or "ok")'

# ---- correctness on the GPU: each backend's whole test file (its reference comparisons run on
# CUDA tensors here, and the tests marked gpu add realistic shapes, determinism, opcheck and
# torch.compile). The compile-only checks (tests/test_*_compile.py, test_cuda_build.py) and the
# CPU emulation are CI's, on machines without a GPU; here the real compilers ran.
# With pytest-xdist, 8 processes share the GPU: Triton compiles each kernel specialisation of
# the test cases on first use, one at a time per process, and that dominates the file's time.
PARALLEL=()
if "$PY" -c 'import xdist' 2> /dev/null; then PARALLEL=(-n 8); fi
for backend in cuda triton; do
  case $backend in cuda) cap=90 reserve=220 ;; triton) cap=120 reserve=190 ;; esac
  stage "${backend}_tests" $cap $reserve "$PY" -m pytest -q -rfE -p no:cacheprovider "${PARALLEL[@]}" \
    "tests/test_${backend}_backend.py" --junitxml="$OUT/${backend}_tests.xml"
done

# ---- compute-sanitizer on small cases of the cuda backend (every dtype, layouts, image tiles
# 16/64/128): memcheck with PyTorch's caching allocator off (else an access past a tensor but
# inside a cached segment goes unseen); racecheck for shared-memory hazards comes later, as time allows
SANITIZER="$(command -v compute-sanitizer || true)"
if [ -z "$SANITIZER" ] && [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" ]; then
  SANITIZER="${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer"
fi
SANITIZER_CASE='
import torch, sib_fast
from sib_fast.backends import dispatch
reason = dispatch.unavailable_reason("cuda", "cuda")
assert reason is None, reason
cases = [(3, 3, 13, 11, 5, torch.float32, "contiguous"), (5, 2, 9, 7, 3, torch.bfloat16, "channels_last"),
         (20, 1, 6, 5, 3, torch.float32, "transposed"), (70, 1, 4, 6, 3, torch.float32, "sliced"),
         (3, 2, 8, 8, 3, torch.float64, "contiguous"), (2, 3, 5, 5, 31, torch.float16, "contiguous")]
for B, C, H, W, k, dtype, layout in cases:
    g = torch.Generator(device="cuda").manual_seed(0)
    R = (torch.randn(B, C, H, 2 * W, device="cuda", generator=g) * 1e-3).to(dtype)
    x = torch.rand(B, C, H, 2 * W, device="cuda", generator=g).to(dtype)
    R, x = (R[..., ::2], x[..., ::2]) if layout == "sliced" else (R[..., :W].contiguous(), x[..., :W].contiguous())
    if layout == "channels_last":
        R, x = R.contiguous(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    if layout == "transposed":
        R, x = R.transpose(2, 3), x.transpose(2, 3)
    R.requires_grad_(); x.requires_grad_()
    hsic, bg, mask = sib_fast.sib_terms(R, x, window_size=k, backend="cuda")
    (hsic + bg + mask.mean()).backward()
torch.cuda.synchronize()
print("cuda backend: all cases ran")
'
if [ -n "$SANITIZER" ]; then
  stage cuda_memcheck 60 170 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck --error-exitcode 1 \
    "$PY" -c "$SANITIZER_CASE"
else
  log "skip cuda_memcheck: compute-sanitizer not found"
  echo "cuda_memcheck skipped 0" >> "$OUT/SUMMARY.txt"
fi

# ---- sib-bench head (float32), largest batch first and torch.compile last in each batch
# (sib-bench's lane order), so a stage cut short keeps the rows the targets are about; then step
stage head_float32 150 80 "$PY" -m sib_fast.bench --device cuda --batch 128,32,8 --compile-batch 128,32 \
  --dtype float32 --min-time 0.3 --profile --json "$OUT/head_float32.json" --plot "$OUT/head_float32.png" \
  --markdown "$OUT/results.md" --note "benchmarks/gpu_check.sh"
stage step 100 35 "$PY" -m sib_fast.bench --device cuda --step --model resnet50,vit_s_16 --step-batch 64 \
  --step-reps 5 --sib-modes every=4,batch=B/8,every=4+batch=B/4 --json "$OUT/step.json" \
  --markdown "$OUT/results.md" --note "benchmarks/gpu_check.sh"
if [ -n "$SANITIZER" ]; then
  stage cuda_racecheck 40 30 "$SANITIZER" --tool racecheck --error-exitcode 1 "$PY" -c "$SANITIZER_CASE"
fi
stage head_bfloat16 45 0 "$PY" -m sib_fast.bench --device cuda --batch 128 --dtype bfloat16 --no-compile \
  --min-time 0.3 --json "$OUT/head_bfloat16.json" --markdown "$OUT/results.md" --note "benchmarks/gpu_check.sh"
# ---- the random-feature HSIC's fused projections (issue 22), per backend (argument: triton or
# cuda): forward and forward+backward at B = 16 and 128, 3x224x224, F = 512, against the plain
# head's time at the same B (the cost of hsic_features on top of the head) and the materialised
# matrix's products (what the authors pay), with the largest relative error of u @ W against them
# (neither backend's projection has run on a GPU before)
PROJECTION_TIMING='
import sys
import torch
from sib_fast.backends.random_features import gaussian_matrix

backend = sys.argv[1]
if backend == "triton":
    from sib_fast.backends.triton import ops as module
else:
    from sib_fast.backends import extension as module

def ms(fn, reps=10):
    fn(); torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record(); torch.cuda.synchronize()
    return start.elapsed_time(end) / reps

for B in (16, 128):
    R = (torch.randn(B, 3, 224, 224, device="cuda") * 1e-3).requires_grad_()
    x = torch.rand(B, 3, 224, 224, device="cuda")
    mask = torch.rand(B, 224, 224, device="cuda").requires_grad_()
    gp = torch.randn(2, B, 512, device="cuda")
    def forward():
        return module.masked_projection(R, x, mask, 512, 7)
    def both():
        proj, sq = forward()
        torch.autograd.grad((proj * gp).sum() + sq.sum(), (R, mask))
    def head():
        hsic, bg, m = module.sib_terms(R, x, 31, 0.1, 10.0)
        torch.autograd.grad(hsic + bg, R)
    W = gaussian_matrix(7, 3 * 224 * 224, 512, dtype=torch.float32, device="cuda")
    u = (R.detach() * mask.detach()[:, None]).reshape(B, -1)
    def materialised():
        return u @ W, (x * mask.detach()[:, None]).reshape(B, -1) @ W
    err = ((forward()[0].detach()[0] - u @ W).abs().max() / (u @ W).abs().max()).item()
    print(f"B={B}: {backend} projection forward {ms(forward):.3f} ms, forward+backward {ms(both):.3f} ms; "
          f"plain {backend} head forward+backward {ms(head):.3f} ms; materialised W products (forward only) "
          f"{ms(materialised):.3f} ms; max relative error of u @ W against the materialised product {err:.2e}",
          flush=True)
'
stage triton_projection 40 0 "$PY" -c "$PROJECTION_TIMING" triton
stage cuda_projection 40 0 "$PY" -c "$PROJECTION_TIMING" cuda
# ---- with what time is left: the Triton launch-plan constants chosen without a GPU, against
# their alternatives (B=128, float32, forward+backward)
stage triton_plans 90 0 "$PY" -m sib_fast.bench.tune --json "$OUT/triton_plans.json"

log "done in $((SECONDS - START))s; failures: $FAILED"
cat "$OUT/SUMMARY.txt"
[ -f "$OUT/results.md" ] && cat "$OUT/results.md"
exit "$FAILED"
