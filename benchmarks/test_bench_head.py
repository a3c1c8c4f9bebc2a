"""pytest-benchmark of the S-IB head: every available backend next to the eager reference.

Each case is one (part, device, dtype, shape) group, so pytest-benchmark's
table puts the backends of a group side by side in the same run. Before a
fused backend is timed it is compared with the eager reference on the same
inputs. Inputs rotate over several sets (see sib_fast.bench.measure); CUDA
work is synchronised inside the timed call. ``extra_info`` holds the floor
bytes of docs/loss.md section 7 and the achieved GB/s.

For the full report (IQR, memory, share of the copy bandwidth) use ``sib-bench``.
"""
from __future__ import annotations

import functools
import itertools

import pytest
import torch

from sib_fast.bench.lanes import UPSTREAM, lane_function, relative_error, select_lanes
from sib_fast.bench.machine import cache_bytes
from sib_fast.bench.measure import floor_bytes, make_head_inputs, rotation_count

SMALL = {"cpu": [(4, 3, 64, 64), (3, 1, 17, 23)], "cuda": [(32, 3, 224, 224)]}
LARGE = {"cpu": [(16, 3, 224, 224)], "cuda": [(128, 3, 224, 224)]}
ROUNDS = {"cpu": 5, "cuda": 30}  # CPU: CI runs this suite; a smoke-sized sample, not a measurement
WINDOW = 31
TOLERANCE = 1e-3  # relative to the largest value; the backends' own tests hold them to 1e-4 against float64


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    large = metafunc.config.getoption("--bench-large", default=False)
    with_compile = metafunc.config.getoption("--bench-compile", default=False)
    cases, ids = [], []
    for device in ["cpu", "cuda"]:
        if device == "cuda" and not torch.cuda.is_available():
            continue
        shapes = SMALL[device] + (LARGE[device] if large else [])
        for shape in shapes:
            for lane in select_lanes("all", torch.device(device), no_compile=not with_compile):
                marks = [pytest.mark.gpu] if device == "cuda" else []
                cases.append(pytest.param((device, lane, shape), marks=marks))
                ids.append(f"{device}-{'x'.join(map(str, shape))}-{lane}")
    metafunc.parametrize("case", cases, ids=ids)


@functools.cache  # one torch.compile per session, not per case
def _function(lane: str):
    return lane_function(lane, WINDOW)


class Head:
    """Inputs, the function under test and its parts, for one case."""

    def __init__(self, device: str, lane: str, shape):
        self.device = torch.device(device)
        self.fn = _function(lane)
        floors = floor_bytes(shape, torch.float32)
        n = rotation_count(2 * floors["tensor"], cache_bytes(self.device), budget=2 * 1024 ** 3)
        self.inputs = [make_head_inputs(*shape, torch.float32, self.device, seed=i) for i in range(n)]
        self._next = itertools.cycle(self.inputs)
        self.upstream = tuple(torch.tensor(u, device=self.device) for u in UPSTREAM)
        self.floors = floors

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def forward(self, inp):
        out = self.fn(*inp)
        self.sync()
        return out

    def backward(self, inp, out):
        dR = torch.autograd.grad((out[0], out[1]), (inp[0],), self.upstream)[0]
        self.sync()
        return dR

    def forward_backward(self, inp):
        return self.backward(inp, self.fn(*inp))

    def rotate(self):
        return (next(self._next),), {}

    def rotate_and_forward(self):
        inp = next(self._next)
        return (inp, self.forward(inp)), {}


def _record(benchmark, head: Head, part: str, case):
    device, lane, shape = case
    benchmark.group = f"{part} {device} float32 {'x'.join(map(str, shape))}"
    benchmark.extra_info.update({"backend": lane, "floor_bytes": head.floors[part]})


def _finish(benchmark, head: Head, part: str):
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None and stats.stats.median > 0:
        benchmark.extra_info["floor_GBps"] = head.floors[part] / stats.stats.median / 1e9


def _check_against_reference(head: Head, lane: str):
    if lane == "reference":
        return
    inp = head.inputs[0]
    expected = _function("reference")(*inp)
    dR_expected = head.backward(inp, expected)
    actual = head.fn(*inp)
    dR = head.backward(inp, actual)
    for name, a, e in (("hsic", actual[0], expected[0]), ("bg", actual[1], expected[1]), ("dR", dR, dR_expected)):
        err = relative_error(a, e)
        assert err <= TOLERANCE, f"{lane} {name} differs from the reference by {err:.2e} (relative)"


def test_head_forward(benchmark, case):
    head = Head(*case)
    _record(benchmark, head, "fwd", case)
    benchmark.pedantic(head.forward, setup=head.rotate, rounds=ROUNDS[case[0]], warmup_rounds=1)
    _finish(benchmark, head, "fwd")


def test_head_backward(benchmark, case):
    head = Head(*case)
    _record(benchmark, head, "bwd", case)
    benchmark.pedantic(head.backward, setup=head.rotate_and_forward, rounds=ROUNDS[case[0]], warmup_rounds=1)
    _finish(benchmark, head, "bwd")


def test_head_forward_backward(benchmark, case):
    head = Head(*case)
    _check_against_reference(head, case[1])
    _record(benchmark, head, "fwd_bwd", case)
    benchmark.pedantic(head.forward_backward, setup=head.rotate, rounds=ROUNDS[case[0]], warmup_rounds=1)
    _finish(benchmark, head, "fwd_bwd")
