"""Builds sib_fast and its extension sib_fast._C (C++ always, CUDA when possible).

SIB_FAST_CUDA=1 forces the CUDA sources in, SIB_FAST_CUDA=0 leaves them out;
unset, they are built when torch has CUDA and nvcc is found (CUDA_HOME).
"""
import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


def cuda_toolkit_problem():
    """None if the CUDA sources can be built here, else why not."""
    if torch.version.cuda is None:
        return "this torch build has no CUDA"
    if CUDA_HOME is None:
        return "nvcc was not found (set CUDA_HOME)"
    if not glob.glob(os.path.join(CUDA_HOME, "lib*", "libcudart.so*")):
        return f"CUDA_HOME={CUDA_HOME} holds no libcudart (set CUDA_HOME to the toolkit, e.g. /usr/local/cuda)"
    return None


def build_cuda(cuda_sources) -> bool:
    flag = os.environ.get("SIB_FAST_CUDA")
    if flag not in (None, "", "0", "1"):
        raise SystemExit(f"SIB_FAST_CUDA must be 0 or 1, got {flag!r}")
    if flag == "0" or not cuda_sources:
        return False
    problem = cuda_toolkit_problem()
    if problem and flag == "1":
        raise SystemExit(f"SIB_FAST_CUDA=1 but the CUDA kernels cannot be built: {problem}")
    if problem:
        print(f"sib_fast: building without CUDA kernels: {problem}")
    return problem is None


def extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # -fopenmp compiles at::parallel_for's OpenMP regions; the OpenMP runtime
    # itself is the one torch has already loaded, so it is not linked here.
    # The C++ standard is the one torch's build helper picks. -fno-trapping-math
    # and -fno-math-errno let the row loops vectorise (no FP exceptions or errno
    # are relied on); NaN and Inf semantics are unchanged.
    cxx = ["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"]
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    if build_cuda(cuda_sources):
        # kernels (.cu, nvcc) and their host side (.cpp: ATen, built by the C++ compiler)
        sources += cuda_sources + sorted(glob.glob("csrc/cuda/*.cpp"))
        arch = os.environ.get("SIB_FAST_CUDA_ARCH", "80;90").split(";")
        nvcc = ["-O3", "--use_fast_math", "-lineinfo"]
        nvcc += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in arch]
        if os.environ.get("SIB_FAST_PTXAS_VERBOSE") == "1":
            nvcc += ["-Xptxas", "-v"]
        return CUDAExtension("sib_fast._C", sources, include_dirs=[os.path.abspath("csrc")],
                             extra_compile_args={"cxx": cxx, "nvcc": nvcc})
    return CppExtension("sib_fast._C", sources, include_dirs=[os.path.abspath("csrc")],
                        extra_compile_args={"cxx": cxx})


setup(
    packages=find_packages(include=["sib_fast", "sib_fast.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
)
