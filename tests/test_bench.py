"""Tests of the benchmark tool ``sib-bench`` itself: its arithmetic, its record, tiny runs."""
from __future__ import annotations

import json
import math

import pytest
import torch

import sib_fast
from sib_fast.bench import cli as bench
from sib_fast.bench.head import add_speedups
from sib_fast.bench.lanes import COMPILE_LANE, select_lanes
from sib_fast.bench.measure import (floor_bytes, make_head_inputs, peak_extra_memory, rotation_count,
                                    summarize)
from sib_fast.bench.record import PARTS, SCHEMA
from sib_fast.cli_errors import UsageError

# one thread: on a loaded 2-core machine OpenMP barriers make 2 threads 10-100x slower on tiny shapes
TINY = ["--device", "cpu", "--threads", "1", "--quick", "--copy-mib", "16", "--no-compile"]


def test_floor_bytes_are_spec_section_7():
    # R and x read once, dR written once; the forward only reads
    f = floor_bytes((2, 3, 4, 5), torch.float32)
    assert f == {"tensor": 480, "fwd": 960, "bwd": 1440, "fwd_bwd": 1440}
    assert floor_bytes((2, 3, 4, 5), torch.bfloat16)["fwd_bwd"] == 720
    assert floor_bytes((2, 3, 4, 5), torch.float64)["fwd"] == 1920
    # dx written too when x requires grad
    assert floor_bytes((2, 3, 4, 5), torch.float32, grad_x=True)["fwd_bwd"] == 1920
    # the 224x224 headline shape: 128 x 3 x 224 x 224 float32 is 77 MB per tensor, 231 MB in all
    assert floor_bytes((128, 3, 224, 224), torch.float32)["fwd_bwd"] == 3 * 128 * 3 * 224 * 224 * 4


def test_summary_is_median_and_interquartile_range():
    s = summarize([5.0, 1.0, 4.0, 2.0, 3.0, 100.0, 0.5])
    assert s["median"] == 3.0 and s["min"] == 0.5 and s["n"] == 7
    assert s["q1"] == 1.5 and s["q3"] == 4.5 and s["iqr"] == 3.0
    assert summarize([2.0])["iqr"] == 0.0
    with pytest.raises(ValueError):
        summarize([])


def test_rotation_covers_the_cache_within_the_budget():
    assert rotation_count(10, cache=1000, budget=10**9) == 8  # capped
    assert rotation_count(600, cache=1000, budget=10**9) == 5  # ceil(2000/600) + 1 sets exceed twice the cache
    assert rotation_count(10**6, cache=1000, budget=10**9) == 2  # never the same tensors twice in a row
    assert rotation_count(10**6, cache=1000, budget=10**6) == 1  # unless memory forbids


def test_inputs_look_like_a_vjp_map():
    R, x = make_head_inputs(3, 2, 20, 24, torch.float32, torch.device("cpu"), seed=1)
    assert R.shape == x.shape == (3, 2, 20, 24) and R.requires_grad and not x.requires_grad
    assert 0.2 < (R == 0).float().mean().item() < 0.4
    assert R.abs().max().item() < 1e-2
    R2, _ = make_head_inputs(3, 2, 20, 24, torch.float32, torch.device("cpu"), seed=1)
    assert torch.equal(R, R2)


def test_cpu_peak_memory_sees_a_known_allocation():
    def run():
        keep = torch.ones(1_000_000)  # 4 MB kept
        tmp = torch.ones(500_000)  # 2 MB freed before returning
        del tmp
        return keep

    mem = peak_extra_memory(run, torch.device("cpu"))
    assert mem["method"] in ("cpu-allocator", "rss-high-water")
    assert 5.9e6 <= mem["bytes"] <= 6.5e6


def test_lane_selection():
    lanes = select_lanes("all", torch.device("cpu"), no_compile=False)
    assert lanes[0] == "reference" and lanes[-1] == COMPILE_LANE and "triton" not in lanes
    assert select_lanes("cpu,compile", torch.device("cpu"), no_compile=True) == ["reference", "cpu"]
    with pytest.raises(UsageError, match="unknown backend"):
        select_lanes("fast", torch.device("cpu"), no_compile=False)


@pytest.mark.parametrize("argv, message", [
    (["--batch", "1"], "at least 2"), (["--batch", "a"], "integers"), (["--dtype", "int8"], "--dtype"),
    (["--size", "0"], "--size"), (["--window", "4"], "odd"), (["--backends", "nope"], "unknown backend"),
    (["--device", "tpu"], "--device"),
])
def test_bad_arguments_end_with_one_line(argv, message, capsys):
    assert bench.main(TINY + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and err[-1].startswith("sib-bench: ")


@pytest.fixture(scope="module")
def head_record(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "head.json"
    assert bench.main(TINY + ["--batch", "2,3", "--size", "24x20", "--json", str(path)]) == 0
    return json.loads(path.read_text()), path


def test_head_record_schema_and_sane_numbers(head_record):
    record, _ = head_record
    assert record["schema"] == SCHEMA and record["mode"] == "head"
    for key in ("created", "argv", "machine", "versions", "git", "copy_bandwidth", "rows", "head_settings"):
        assert key in record
    assert record["machine"]["cpu_model"] and record["versions"]["torch"] == torch.__version__
    assert set(record["git"]) == {"commit", "dirty"}
    copy = record["copy_bandwidth"]["GBps"]
    assert 0.1 < copy < 1e5
    lanes = record["head_settings"]["lanes"]
    assert len(record["rows"]) == 2 * len(lanes)
    for row in record["rows"]:
        assert row["kind"] == "head" and row["dtype"] == "float32" and row["height"] == 24 and row["width"] == 20
        assert "error" not in row, row.get("error")
        for part in PARTS:
            t = row["timings"][part]
            assert 0 < t["min"] <= t["q1"] <= t["median"] <= t["q3"] and t["n"] >= 3
            assert math.isclose(row["achieved_GBps"][part], row["floor_bytes"][part] / t["median"] / 1e9)
            assert math.isclose(row["pct_of_copy_bw"][part], 100 * row["achieved_GBps"][part] / copy)
        assert row["peak_extra_bytes"]["fwd_bwd"] >= row["floor_bytes"]["tensor"]  # dR itself at least
        assert row["speedup_vs_reference"]["fwd_bwd"] > 0
        assert max(row["max_rel_err"].values()) < 1e-3
    ref_rows = [r for r in record["rows"] if r["backend"] == "reference"]
    assert all(r["speedup_vs_reference"]["fwd"] == 1.0 for r in ref_rows)


def test_from_json_renders_plots_and_appends(head_record, tmp_path, capsys):
    _, path = head_record
    md = tmp_path / "RESULTS.md"
    png = tmp_path / "head.png"
    assert bench.main(["--from-json", str(path), "--markdown", str(md), "--plot", str(png)]) == 0
    printed = capsys.readouterr().out
    assert "| reference |" in printed and "GB/s" in printed
    text = md.read_text()
    assert text.startswith("\n### Head: ") and "commit " in text and "| float32 | 2 | 3x24x20 | reference |" in text
    assert png.stat().st_size > 10_000
    bench.main(["--from-json", str(path), "--markdown", str(md)])
    assert md.read_text().count("### Head: ") == 2  # appended, never overwritten


def test_profile_keeps_the_template_arguments_that_tell_kernels_apart():
    from sib_fast.bench.profile import short_name

    def demangled(which_pass):
        return ("void sib_fast::cuda::(anonymous namespace)::backward_kernel<float, float, 64, 128, "
                f"(sib_fast::cuda::(anonymous namespace)::Pass){which_pass}>(float const*, float const*, "
                "sib_fast::cuda::Map4, sib_fast::cuda::Map4, float const*, bool, sib_fast::cuda::PlaneLayout, bool)")

    assert short_name(demangled(0)) == "backward_kernel<float, float, 64, 128, (Pass)0>"
    assert short_name(demangled(0)) != short_name(demangled(1))
    assert short_name("_gram_kernel") == "_gram_kernel"
    assert len(short_name("void f<" + "int, " * 40 + "int>(int)")) == 90


@pytest.mark.skipif("cpu" not in sib_fast.available_backends("cpu"), reason="sib_fast._C has no CPU kernels")
def test_profile_names_the_fused_ops_largest_first(tmp_path, capsys):
    path = tmp_path / "head.json"
    argv = TINY + ["--batch", "2", "--size", "24x20", "--backends", "cpu", "--no-memory", "--profile",
                   "--json", str(path)]
    assert bench.main(argv) == 0
    rows = json.loads(path.read_text())["rows"]
    assert [r["backend"] for r in rows] == ["reference", "cpu"]
    for row in rows:
        prof = row["profile"]
        us = [e["us"] for e in prof["entries"]]
        assert us and us == sorted(us, reverse=True) and us[-1] > 0
        assert sum(us) <= prof["total_us"] * (1 + 1e-9)
        assert math.isclose(prof["entries"][0]["share"], us[0] / prof["total_us"])
    fused = [e["name"] for e in rows[1]["profile"]["entries"]]
    assert "sib_fast::sib_head_forward" in fused and "sib_fast::sib_head_backward" in fused
    reference = [e["name"] for e in rows[0]["profile"]["entries"]]
    assert not any(name.startswith("sib_fast::") for name in reference)
    printed = capsys.readouterr().out
    assert "kernels of one forward+backward (--profile)" in printed and "`sib_fast::sib_head_backward`" in printed


def test_step_mode_tiny_run(tmp_path):
    path = tmp_path / "step.json"
    argv = ["--device", "cpu", "--threads", "1", "--copy-mib", "16", "--step", "--model", "tiny_cnn", "--step-size", "16",
            "--step-batch", "2", "--step-reps", "2", "--num-classes", "5", "--json", str(path)]
    assert bench.main(argv) == 0
    record = json.loads(path.read_text())
    assert record["mode"] == "step"
    rows = record["rows"]
    assert [r["row"] for r in rows][:2] == ["plain CE", "S-IB exact"] and rows[-1]["row"] == "plain CE (again)"
    # ratios against the faster plain step
    assert min(r["x_plain_step"] for r in rows if r["vjp"] is None) == 1.0
    ok = [r for r in rows if "timing" in r]
    assert {r["vjp"] for r in ok} >= {None, "exact"}
    for row in ok:
        assert row["images_per_s"] > 0 and row["timing"]["median"] > 0
    for row in rows:  # a row that did not run says why
        assert "timing" in row or row["error"]


def test_step_mode_times_the_cheaper_sib_steps(tmp_path, monkeypatch):
    from sib_fast.bench import step

    calls = []
    real = step.sib_backward
    monkeypatch.setattr(step, "sib_backward", lambda *a, **kw: (calls.append(kw), real(*a, **kw))[1])
    path = tmp_path / "step.json"
    argv = ["--device", "cpu", "--threads", "1", "--copy-mib", "16", "--step", "--model", "tiny_cnn", "--step-size", "16",
            "--step-batch", "8", "--step-reps", "1", "--num-classes", "3", "--vjp", "exact",
            "--sib-modes", "every=3,batch=B/4+bn=running,every=2+batch=4,every=3+separate", "--json", str(path)]
    assert bench.main(argv) == 0
    rows = {r["row"]: r for r in json.loads(path.read_text())["rows"]}
    lazy = rows["S-IB exact, every 3"]
    assert (lazy["sib_every"], lazy["sib_batch"]) == (3, None) and lazy["timing"]["median"] > 0
    assert rows["S-IB exact, batch 2 (running)"]["sib_bn"] == "running"
    assert "S-IB exact, every 2, batch 4 (frozen)" in rows
    # a lazy row's timed call is a whole cycle: the S-IB step and K - 1 plain ones
    cycle = [kw["step"] for kw in calls if kw.get("sib_every") == 3 and not kw.get("sib_only")]
    assert cycle[:6] == [0, 1, 2, 0, 1, 2]
    # the separate form: three plain steps and the S-IB terms' own step per cycle
    assert rows["S-IB exact, every 3, separate step"]["timing"]["median"] > 0
    own = [kw for kw in calls if kw.get("sib_only")]
    assert own and all(kw["sib_every"] == 3 for kw in own) and len(own) * 3 <= len(cycle)


@pytest.mark.parametrize("modes,words", [("every=0", "every >= 1"), ("batch=1", "2 <= batch"),
                                         ("batch=B/0", "batch=B/n"), ("bn=mean", "bn=frozen|batch|running"),
                                         ("often=2", "every=K")])
def test_step_mode_refuses_a_bad_sib_mode(modes, words, capsys):
    argv = ["--device", "cpu", "--step", "--model", "tiny_cnn", "--step-batch", "8", "--sib-modes", modes]
    assert bench.main(argv) == 2
    assert words in capsys.readouterr().err


def test_agreement_of_the_cheaper_steps(tmp_path):
    from sib_fast.bench import agreement

    path = tmp_path / "agreement.json"
    assert agreement.main(["--model", "tiny_cnn", "--size", "16", "--batch", "4", "--batches", "2", "--window", "3",
                           "--threads", "1", "--json", str(path)]) == 0
    rows = {r["mode"]: r for r in json.loads(path.read_text())["rows"]}
    assert set(rows) == {f"--sib-batch 2 --sib-bn {bn}" for bn in ("frozen", "batch", "running")} | {"--sib-every 2"}
    for row in rows.values():
        assert -1.0 <= row["averaged"] <= 1.0


def test_step_mode_exact_rows_run_a_vit_on_math_attention(tmp_path):
    # tiny_vit's fused attention has no double backward: sib_backward alone raises for it, the
    # step benchmark's exact rows run it on the math backend and time it
    from sib_fast import SIBLoss, sib_backward
    from sib_fast.training.step import DoubleBackwardUnsupportedError
    from sib_fast.training.models import build_model

    model = build_model("tiny_vit", 3, 16)
    x, y = torch.rand(2, 3, 16, 16), torch.tensor([0, 2])
    with pytest.raises(DoubleBackwardUnsupportedError):
        sib_backward(model, x, y, SIBLoss(backend="reference"), vjp="exact")
    path = tmp_path / "step.json"
    argv = ["--device", "cpu", "--threads", "1", "--copy-mib", "16", "--step", "--model", "tiny_vit", "--step-size", "16",
            "--step-batch", "2", "--step-reps", "1", "--num-classes", "3", "--vjp", "exact", "--json", str(path)]
    assert bench.main(argv) == 0
    rows = json.loads(path.read_text())["rows"]
    exact = [r for r in rows if r["vjp"] == "exact"]
    assert exact and all(r["timing"]["median"] > 0 for r in exact), [r.get("error") for r in exact]


def test_step_models_are_the_training_commands_models():
    from sib_fast.bench import step
    from sib_fast.training.models import SmallCNN, build_model

    assert step.build_model is build_model
    assert isinstance(build_model("sib_cnn", 3, 16), SmallCNN)
    assert build_model("tiny_cnn", 3, 16)(torch.rand(2, 3, 16, 16)).shape == (2, 3)
    with pytest.raises(ValueError, match="did you mean resnet50"):
        build_model("resnet5O", 3, 16)


def test_main_leaves_the_thread_count_as_it_found_it():
    before = torch.get_num_threads()
    bench.main(TINY + ["--batch", "1"])  # fails after setting threads
    assert torch.get_num_threads() == before


# ---------------------------------------------------------------- python -m sib_fast.bench.tune

@pytest.mark.parametrize("text,message", [
    ("FOO=1", "NAME one of"), ("HBOX_BLOCK=4", "takes HxW"), ("SELECT_CHUNK=2x8", "takes an integer"),
    ("SELECT_CHUNK=1000", "power of two"), ("SELECT_DIGIT_BITS=9", "1 to 8"), ("BWD_SINGLE_MAX=0", "positive"), (",", "empty variant")])
def test_tune_rejects_bad_variants(text, message):
    from sib_fast.bench import tune

    with pytest.raises(UsageError, match=message):
        tune.parse_variant(text)


def test_tune_parses_variants():
    from sib_fast.bench import tune

    assert tune.parse_variant("VBOX_BLOCK=64x32, BWD_SINGLE_MAX=48") == {"VBOX_BLOCK": (64, 32), "BWD_SINGLE_MAX": 48}
    assert tune.parse_variant("SELECT_DIGIT_BITS=3") == {"SELECT_DIGIT_BITS": 3}  # not a power of two: a width


@pytest.mark.slow
def test_tune_variants_compute_the_default_result(tmp_path):
    # In Triton's interpreter on CPU tensors: a variant that loops over several selection chunks
    # and box blocks must give the default's hsic, bg and dR; the table flags any that do not.
    # A variant equal to the default is left out.
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    path = tmp_path / "tune.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "sib_fast.bench.tune", "--device", "cpu", "--batch", "3",
                           "--size", "7", "--window", "3", "--min-reps", "1", "--max-reps", "1", "--min-time", "0",
                           "--variant", "SELECT_CHUNK=16,HBOX_BLOCK=2x4,VBOX_BLOCK=2x4,BWD_PIXEL_BLOCK=32",
                           "--variant", "SELECT_CHUNK=2048", "--json", str(path)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(path.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["default", "SELECT_CHUNK=16,HBOX_BLOCK=2x4,VBOX_BLOCK=2x4,BWD_PIXEL_BLOCK=32",
                                            "default (again)"]
    assert rows[1]["settings"] == {"SELECT_CHUNK": 16, "HBOX_BLOCK": [2, 4], "VBOX_BLOCK": [2, 4], "BWD_PIXEL_BLOCK": 32}
    assert max(rows[1]["max_rel_err"].values()) <= 1e-5
    assert max(rows[2]["max_rel_err"].values()) == 0.0  # same settings, same bits
    assert all(r["fwd_bwd"]["n"] == 1 for r in rows)
    assert "differs" not in proc.stdout and "| default (again) |" in proc.stdout
    assert "SELECT_CHUNK=2048: skipped, the default here" in proc.stdout  # nothing to compare


def test_speedups_are_against_eager_and_compiled_of_the_same_shape():
    def row(backend, ms):
        return {"backend": backend, "timings": {p: {"median": ms / 1e3} for p in PARTS}}

    rows = [row("reference", 100.0), row("cpu", 4.0), row(COMPILE_LANE, 20.0), {"backend": "triton"}]
    add_speedups(rows)
    assert rows[1]["speedup_vs_reference"]["fwd_bwd"] == pytest.approx(25.0)
    assert rows[1]["speedup_vs_compiled"]["fwd"] == pytest.approx(5.0)
    assert rows[2]["speedup_vs_compiled"]["bwd"] == pytest.approx(1.0)
    assert "speedup_vs_reference" not in rows[3]  # a row that did not run
    no_compile = [row("reference", 100.0), row("cpu", 4.0)]
    add_speedups(no_compile)
    assert "speedup_vs_compiled" not in no_compile[1]
