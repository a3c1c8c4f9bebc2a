"""pytest-benchmark suite of the S-IB head (``python -m pytest benchmarks``).

Small CPU shapes by default, so CI runs it in well under a minute; larger
shapes with ``--bench-large`` (or SIB_FAST_BENCH_LARGE=1), ``torch.compile`` of
the reference with ``--bench-compile`` (about a minute of compilation per
shape on a small CPU). CUDA shapes are generated only when a GPU is present.
"""
import importlib.util
import os

if importlib.util.find_spec("pytest_benchmark") is None:
    # the suite needs the plugin (pip install -e ".[bench]"); without it, collect nothing rather than fail
    collect_ignore_glob = ["test_bench_*.py"]


def pytest_addoption(parser):
    group = parser.getgroup("sib_fast benchmarks")
    group.addoption("--bench-large", action="store_true", default=os.environ.get("SIB_FAST_BENCH_LARGE") == "1",
                    help="also benchmark the large shapes (B=16 at 3x224x224 on CPU, B=128 on GPU)")
    group.addoption("--bench-compile", action="store_true",
                    default=os.environ.get("SIB_FAST_BENCH_COMPILE") == "1",
                    help="also benchmark torch.compile of the reference (slow to compile)")
