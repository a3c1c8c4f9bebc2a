"""The CUDA masked projections of the random-feature HSIC (csrc/cuda/sib_projection_cuda.cu, issue 22)
run in the CUDA emulation (tests/test_cuda_emulated.py builds it), against the float64 contract at
the same seed (tests/projection_contract.py: u @ W, v @ W, the squared norms and their gradients,
W materialised by random_features.gaussian_matrix).

The emulation runs a block's threads one by one, so the cases are small: C in {1, 3}, 1x1, odd and
non-square images, F in {1, 7, 64, 512} (512 on a tiny image), contiguous, channels_last,
transposed and sliced inputs, float32, bfloat16 and float64, x with and without its gradient, each
output alone, NaN, and grids of several chunks, F blocks and image blocks. Unit images project to
W's own rows, so the kernels' generator (polynomial log, sine and cosine in float32) is checked
entry by entry. On a GPU, tests/test_cuda_backend.py runs the real kernels.
"""
import pytest
import torch

from projection_contract import (CASES, UNIT_IMAGE_SEEDS, case_id, check_unit_images, compare_projection, contract,
                                 maps, upstream)
from sib_fast.backends import random_features, reference
from test_cuda_emulated import _build_and_register, pytestmark  # noqa: F401 (skipped with it)


@pytest.fixture(scope="module", autouse=True)
def _emulation():
    _build_and_register()


def emulated(R, x, mask, features, seed):
    return torch.ops.sib_fast_emu.masked_projection_forward(R, x, mask, features, seed)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_the_float64_contract(case):
    B, C, H, W, features, layout, dtype, x_grad = case
    R, x, mask = maps(B, C, H, W, dtype, seed=B + H, layout=layout)
    compare_projection(emulated, R, x, mask, features, seed=12345 + features, x_grad=x_grad, what="emulated cuda")


@pytest.mark.parametrize("use", ["proj", "sq"])
def test_each_output_alone(use):
    # only proj: the backward without the 2 gS u term (grad_sq None); only sq: grad_proj zeros
    R, x, mask = maps(3, 2, 4, 5, seed=3)
    compare_projection(emulated, R, x, mask, 9, seed=7, use_proj=use == "proj", use_sq=use == "sq",
                       what=f"emulated cuda, {use} alone")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_several_chunks_f_blocks_and_image_blocks(monkeypatch, dtype):
    # B = 20: image blocks of 16 (float32) or 8 (float64); 150 pairs: F blocks of 128; D = 42 rows,
    # two tiles of 32, in two chunks on the emulation's GPU of 4 multiprocessors (8 blocks each,
    # over 2 F blocks x 2-3 image blocks): partials of two chunks summed, each image block its own W
    R, x, mask = maps(20, 2, 3, 7, dtype, seed=4)
    compare_projection(emulated, R, x, mask, 300, seed=99, what="emulated cuda, several blocks")
    # and a grid of 64 tiles in as many chunks (a GPU of 64 multiprocessors), B = 3
    monkeypatch.setenv("SIB_FAST_EMU_NUM_SMS", "64")
    R, x, mask = maps(3, 1, 40, 51, dtype, seed=5)
    compare_projection(emulated, R, x, mask, 5, seed=98, what="emulated cuda, 64 chunks")


@pytest.mark.parametrize("seed", UNIT_IMAGE_SEEDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_unit_images_project_to_the_rows_of_w(seed, dtype):
    check_unit_images(emulated, seed, dtype)


def test_seeds_give_different_projections():
    R, x, mask = maps(2, 1, 3, 3)
    a, _ = emulated(R, x, mask, 8, 1)
    b, _ = emulated(R, x, mask, 8, 2)
    assert not torch.allclose(a, b)


def test_repeated_runs_are_bitwise_equal():
    R, x, mask = maps(3, 3, 4, 5, seed=5)
    gp, gs = upstream(3, 7, 0, "cpu")
    results = []
    for _ in range(2):
        R_, x_, m_ = (t.clone().requires_grad_() for t in (R, x, mask))
        proj, sq = emulated(R_, x_, m_, 7, 3)
        results.append((proj, sq, *torch.autograd.grad((proj * gp.float()).sum() + (sq * gs.float()).sum(),
                                                       (R_, x_, m_))))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_nan_in_r_propagates_to_its_image():
    R, x, mask = maps(3, 2, 4, 3, seed=6)
    R[1, 1, 2, 0] = float("nan")
    R_, m_ = R.clone().requires_grad_(), mask.clone().requires_grad_()
    proj, sq = emulated(R_, x, m_, 7, 5)
    assert torch.isnan(proj[0, 1]).all() and torch.isnan(sq[0, 1])
    ref_proj, ref_sq, _ = contract(R, x, mask, 7, 5)
    keep = torch.tensor([0, 2])
    torch.testing.assert_close(proj[0, keep].double(), ref_proj[0, keep].detach(), rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(proj[1].double(), ref_proj[1].detach(), rtol=2e-5, atol=1e-6)
    # backward: NaN at the NaN's element of dR and its pixel of dmask, finite elsewhere
    dR, dm = torch.autograd.grad(proj.sum() + sq.sum(), (R_, m_))
    assert torch.isnan(dR[1, 1, 2, 0]) and torch.isnan(dm[1, 2, 0])
    assert torch.isnan(dR).sum() == 1 and torch.isnan(dm).sum() == 1


def test_hsic_f_from_the_emulated_projections_matches_the_reference():
    # HSIC_F of the reference (W materialised, U normalised first) against projected_hsic of the
    # emulated projections with the reference's mask, 1e-4 in float32 (the target)
    R, x, mask = maps(4, 3, 6, 5, seed=8)
    for F, seed in ((7, 3), (64, 2**40 + 1)):
        hsic, _, ref_mask = reference.sib_terms(R.double(), x.double(), 3, hsic_features=F, projection_seed=seed)
        proj, sq = emulated(R, x, ref_mask.float(), F, seed)
        got = random_features.projected_hsic(proj, sq)
        assert abs(got.item() - hsic.item()) <= 1e-4 * max(abs(hsic.item()), 1e-3), (F, got.item(), hsic.item())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_joined_hsic_f_node_matches_the_reference(dtype):
    # the CUDA extension's fused HSIC_F path (autograd.projected_head) on the emulated kernels: its
    # backward adds the head's gradient through sib_head_backward_add_'s composite kernel (the
    # CUDA key has no in-place one), against the float64 reference under random upstream gradients
    from sib_fast.backends.autograd import projected_head
    R, x, _ = maps(3, 3, 5, 6, dtype, seed=6)
    R_ref, x_ref = R.double().requires_grad_(), x.double().requires_grad_()
    R, x = R.requires_grad_(), x.requires_grad_()
    proj, sq, bg, mask = projected_head("sib_fast_emu")(R, x, 3, 0.1, 10.0, 9, 21)
    ref = reference.sib_terms(R_ref, x_ref, 3, hsic_features=9, projection_seed=21)
    g = torch.Generator().manual_seed(2)
    w_hsic, w_bg = 0.5, 2e5  # bg is ~1e-7 here: weighted up so that its share of dR counts
    w_mask = torch.randn(mask.shape, generator=g, dtype=torch.float64)
    total = w_hsic * random_features.projected_hsic(proj, sq) + w_bg * bg + (w_mask.to(dtype) * mask).sum()
    total_ref = w_hsic * ref[0] + w_bg * ref[1] + (w_mask * ref[2]).sum()
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    assert abs(total.item() - total_ref.item()) <= tol * abs(total_ref.item())
    for got, want, name in zip(torch.autograd.grad(total, (R, x)), torch.autograd.grad(total_ref, (R_ref, x_ref)),
                               ("dR", "dx")):
        err = (got.double() - want).abs().max() / want.abs().max()
        assert err <= tol, (name, err.item())


def test_bad_inputs_raise():
    R, x, mask = maps(2, 3, 4, 5)
    with pytest.raises(RuntimeError, match="mask"):
        emulated(R, x, mask[:, :3], 7, 1)
    with pytest.raises(RuntimeError, match="features"):
        emulated(R, x, mask, 0, 1)
    with pytest.raises(RuntimeError, match="compute dtype"):
        emulated(R, x, mask.double(), 7, 1)


def test_opcheck():
    R, x, mask = maps(2, 3, 3, 4, torch.float64)
    op = torch.ops.sib_fast_emu
    torch.library.opcheck(op.masked_projection_forward, (R.requires_grad_(), x.requires_grad_(),
                                                         mask.requires_grad_(), 7, 11))
    gp, gs = upstream(2, 7, 0, "cpu")
    torch.library.opcheck(op.masked_projection_backward, (gp, gs, R.detach(), x.detach(), mask.detach(), 7, 11, True))
    torch.library.opcheck(op.masked_projection_backward, (gp, None, R.detach(), x.detach(), mask.detach(), 7, 11,
                                                          False))
