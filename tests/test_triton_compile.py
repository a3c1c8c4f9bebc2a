"""Every Triton kernel of the backend compiles to a cubin for sm_80 and sm_90 (no GPU needed).

The launchers of ``sib_fast.backends.triton.launch`` run on CPU tensors with their launches
recorded instead of executed (``record_launches``), planned as for each target's GPU (its
capability and multiprocessor count: ``planned_for``), at 224x224 (B=128 and B=256) and at small shapes,
contiguous and channels_last (whose backward planes are strided channels of dR),
for the head's forward and backward (with and without dx), the mask alone and the random-feature
projections (F = 512, backward with and without dx and the squared norms' gradient). Each
recorded launch is specialised exactly as Triton's JIT would (its binder and
``_pack_args``) and compiled with ``triton.compile`` for ``GPUTarget("cuda", 80|90, 32)``;
``cuobjdump -res-usage`` then gives the registers and the stack (local memory: spills).
The interpreter accepts code that the real compiler rejects, so this is the check that
the kernels compile at all; it also fails on spills in the kernels that stream the big
tensors, on shared memory over the architecture's limit and on grids over CUDA's. The
launch-plan variants that ``python -m sib_fast.bench.tune`` times by default are compiled too, for sm_90 at 224x224 (the
kernels they change): they may spill, but must fit the shared memory, or tune's run on a GPU
would fail there.

The compilation runs in a subprocess (``python tests/test_triton_compile.py``) without
``TRITON_INTERPRET``, two targets at a time: with the installed Triton and, when
``SIB_FAST_OTHER_TRITON`` names a directory holding another (CI: Triton 3.6, the oldest
supported), with that one too.
"""
import json
import os
import re
import subprocess
import sys
import tempfile

import pytest

# The passes over R, x and dR: a spill there costs bandwidth on every element.
HOT_KERNELS = ("_channel_mean_kernel", "_gram_kernel", "_bwd_dm_kernel", "_bwd_dr_kernel", "_projection_kernel",
               "_projection_backward_kernel")
PROJECTION_FEATURES = 512  # the random-feature HSIC's projections (issue 22) at the authors' suggested F
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # bytes per block, opt-in maximum
# name: (B, C, H, W), channels_last, dtype. The small float64 and bfloat16 cases specialise the
# kernels for the other compute and input types (a float64 dot, for one, needs its out_dtype).
# B = 256 takes the paths of more than one image block (Gram tiles off the diagonal) on sm_90 too.
SHAPES = {"224x224": ((128, 3, 224, 224), False, "float32"), "224x224-cl": ((128, 3, 224, 224), True, "float32"),
          "224x224-b256": ((256, 3, 224, 224), False, "float32"),
          "small": ((3, 3, 9, 7), False, "float32"), "small-f64": ((3, 3, 9, 7), False, "float64"),
          "small-bf16": ((5, 3, 9, 7), True, "bfloat16")}
TARGETS = (80, 90)
VARIANT_SHAPE = "224x224"  # tune times its variants at B = 128, 3x224x224, float32


# ---------------------------------------------------------------------------------------------
# worker: record the launches of one shape and compile them for one target
# ---------------------------------------------------------------------------------------------

# the launch plan of each target as on its GPU: A100 (108 SMs), H100 (132 SMs)
MULTIPROCESSORS = {80: 108, 90: 132}


def recorded_launches(shape, channels_last, dtype_name, capability):
    import torch
    from sib_fast.backends.triton import launch
    from sib_fast.backends.triton.plan import planned_for

    dtype = getattr(torch, dtype_name)
    B, C, H, W = shape
    layout = torch.channels_last if channels_last else torch.contiguous_format
    with launch.record_launches(execute=False) as calls, \
            planned_for(MULTIPROCESSORS[capability], divmod(capability, 10)):
        R, x = (torch.empty(B, C, H, W, dtype=dtype, memory_format=layout) for _ in range(2))
        hsic, bg, mask, stats, sel_idx, sel_w, gram = launch.launch_head_forward(R, x, 31, 0.1, 10.0)
        gm = torch.empty(B, H, W, dtype=mask.dtype)
        for want_dx in (True, False):
            launch.launch_head_backward(hsic, bg, gm, R, x, mask, stats, sel_idx, sel_w, gram, 31, 0.1, 10.0,
                                        True, want_dx)
        mask, stats, sel_idx, sel_w = launch.launch_mask_forward(R, 31, 0.1, 10.0)
        launch.launch_head_backward(None, None, gm, R, R, mask, stats, sel_idx, sel_w, R.new_empty(0),
                                    31, 0.1, 10.0, False, False)
        proj, sq = launch.launch_projection_forward(R, x, mask, PROJECTION_FEATURES, 2**40 + 7)
        for grad_sq, want_dx in ((sq, True), (None, False)):
            launch.launch_projection_backward(proj, grad_sq, R, x, mask, PROJECTION_FEATURES, 2**40 + 7, want_dx)
    return calls


def _resource_usage(cubin: bytes):
    import triton

    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "-res-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    fields = dict(re.findall(r"(REG|STACK|LOCAL|SHARED):(\d+)", out))
    return int(fields["REG"]), max(int(fields.get("STACK", 0)), int(fields.get("LOCAL", 0)))


def _specialise(kernel, args, meta, backend):
    """What Triton's JIT compiles for this launch: (cache key, signature, constexprs, attrs, options)."""
    from triton.runtime.jit import create_function_from_signature

    kwargs = dict(meta, debug=False)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    key = (kernel.__name__, repr(signature), repr(sorted(constexprs.items(), key=str)),
           repr(sorted(attrs.items(), key=str)), options.num_warps, options.num_stages)
    return key, signature, constexprs, attrs, options


def compile_all(shape_name: str, capability: int, variant: str = ""):
    """Rows of registers, spills and shared memory for each distinct kernel specialisation of the
    launch plan; with ``variant`` (tune's NAME=VALUE,...), those the variant changes."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    from sib_fast.backends.triton.plan import tunables
    from sib_fast.bench import tune

    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    seen = set()
    if variant:
        seen = {_specialise(k, a, m, backend)[0] for k, _, a, m in recorded_launches(*SHAPES[shape_name], capability)}
    with tunables(**(tune.parse_variant(variant) if variant else {})):
        launches = recorded_launches(*SHAPES[shape_name], capability)
    rows = []
    for kernel, grid, args, meta in launches:
        if grid[0] >= 2**31 or any(g > 65535 for g in grid[1:]):
            raise ValueError(f"{kernel.__name__} at {shape_name}, sm_{capability}: grid {grid} is over CUDA's "
                             f"limits (x < 2^31, y and z <= 65535)")
        key, signature, constexprs, attrs, options = _specialise(kernel, args, meta, backend)
        if key in seen:
            continue
        seen.add(key)
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
        regs, stack = _resource_usage(compiled.asm["cubin"])
        flags = {k: v for k, v in meta.items()
                 if k in ("FROM_G", "BACKWARD", "HEAD", "GRAD_X", "SINGLE", "NQ", "HAS_SQ", "SPLIT")}
        rows.append(dict(kernel=kernel.__name__, shape=shape_name, sm=capability, variant=variant, grid=list(grid),
                         warps=options.num_warps, stages=options.num_stages,
                         blocks={k: v for k, v in meta.items()
                                 if k in ("BLOCK", "CHUNK", "BB", "BP", "BH", "BW", "RB", "BD", "BJ")},
                         flags=flags, regs=regs, spill_bytes=stack, shared=compiled.metadata.shared))
    return rows


def _worker(job):
    return compile_all(*job)


def main():
    from concurrent.futures import ProcessPoolExecutor

    from sib_fast.bench.tune import DEFAULT_VARIANTS

    # the default plans everywhere, and tune's variants as the device GPU (sm_90) runs them
    jobs = [(shape, cap) for shape in SHAPES for cap in TARGETS]
    jobs += [(VARIANT_SHAPE, 90, variant) for variant in DEFAULT_VARIANTS]
    with ProcessPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        for rows in pool.map(_worker, jobs):
            for row in rows:
                print(json.dumps(row), flush=True)


# ---------------------------------------------------------------------------------------------
# the test
# ---------------------------------------------------------------------------------------------

def _table(rows):
    lines = [f"{'kernel':22s} {'shape':10s} {'sm':>3s} {'warps':>5s} {'stages':>6s} {'regs':>4s} {'spill':>5s} "
             f"{'smem':>7s}  blocks / flags / tune variant"]
    for r in rows:
        lines.append(f"{r['kernel']:22s} {r['shape']:10s} {r['sm']:>3d} {r['warps']:>5d} {r['stages']:>6d} "
                     f"{r['regs']:>4d} {r['spill_bytes']:>5d} {r['shared']:>7d}  {r['blocks']} {r['flags']}"
                     f" {r['variant']}")
    return "\n".join(lines)


def _defined_kernels():
    """The names of the kernels (``_*_kernel``) the modules of sib_fast.backends.triton define."""
    import importlib
    import pkgutil

    import sib_fast.backends.triton as package

    names = set()
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        names.update(name for name, obj in vars(module).items() if name.startswith("_") and name.endswith("_kernel")
                     and getattr(getattr(obj, "fn", None), "__module__", None) == module.__name__)
    return names


# Another Triton to compile with as well, installed apart (pip install --no-deps --target DIR
# triton==3.6.0): the oldest supported one, whose front end rejects code that 3.8 accepts.
OTHER_TRITON = os.environ.get("SIB_FAST_OTHER_TRITON")
TRITONS = ["installed"] + ([OTHER_TRITON] if OTHER_TRITON else [])


def _triton_version(pythonpath: str) -> str:
    env = dict(os.environ, PYTHONPATH=pythonpath)
    return subprocess.run([sys.executable, "-c", "import triton; print(triton.__version__)"], capture_output=True,
                          text=True, env=env, check=True).stdout.strip()


@pytest.mark.slow
@pytest.mark.parametrize("triton_path", TRITONS, ids=["installed", "other"][:len(TRITONS)])
def test_every_kernel_compiles_for_sm80_and_sm90(triton_path):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = [root] + ([triton_path] if triton_path != "installed" else [])
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    if triton_path != "installed":
        assert os.path.isdir(os.path.join(triton_path, "triton")), f"SIB_FAST_OTHER_TRITON={triton_path} holds no triton"
        print(f"\nTriton {_triton_version(env['PYTHONPATH'])} from {triton_path}")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], capture_output=True, text=True, env=env,
                          cwd=root, timeout=1200)
    assert proc.returncode == 0, f"compilation failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    table = _table(rows)
    print("\n" + table)
    kernels = _defined_kernels()
    for shape in SHAPES:
        for cap in TARGETS:
            compiled = {r["kernel"] for r in rows if r["shape"] == shape and r["sm"] == cap and not r["variant"]}
            assert compiled == kernels, f"{shape} sm_{cap}: compiled {sorted(compiled)}, module has {sorted(kernels)}"
    # the default plans must not spill in the hot kernels; tune's variants may (it times them),
    # but every kernel must launch: within the shared memory of its architecture
    hot_spills = [r for r in rows if r["kernel"] in HOT_KERNELS and r["spill_bytes"] > 0 and not r["variant"]]
    assert not hot_spills, f"register spills in hot kernels:\n{_table(hot_spills)}"
    over = [r for r in rows if r["shared"] > SHARED_LIMIT[r["sm"]]]
    assert not over, f"shared memory over the limit:\n{_table(over)}"


if __name__ == "__main__":
    main()
