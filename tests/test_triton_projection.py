"""The Triton backend's masked projections of the random-feature HSIC (issue 22) against the float64
contract at the same seed (tests/projection_contract.py: u @ W, v @ W and the squared norms with W
materialised by random_features.gaussian_matrix, and their gradients).

Without a GPU the kernels run in Triton's interpreter with the tensor-core rounding of the dots
emulated (the fixtures of tests/test_triton_backend.py), so the cases are small: C in {1, 3}, odd,
non-square and 1x1 images, F in {1, 7, 64, 512} (512 with a tiny image), contiguous, channels_last,
transposed and sliced inputs, float32, bfloat16 and float64, x with and without its gradient, each
output alone, several chunks, F blocks and image blocks. Unit images project to W's own rows, so the
kernels' generator is checked entry by entry against gaussian_matrix, at seeds whose keys take
every sign. With a GPU the same cases run on CUDA tensors; the tests marked gpu add the target's
shape and bitwise repeatability.
"""
import pytest
import torch

from projection_contract import (CASES, UNIT_IMAGE_SEEDS, case_id, check_unit_images, compare_projection, contract,
                                 maps, upstream)

# the interpreter fixtures and the ops module imported as that file imports them (or skipped with it)
from test_triton_backend import DEVICE, _interpreter_for_dispatch, _tensor_core_rounding, tb  # noqa: F401
from test_random_features import compare_hsic_f_with_reference  # sib_terms(hsic_features=F) against the reference
from head_inputs import random_maps

from sib_fast.backends.triton.launch import _signed_keys, launch_projection_forward, record_launches  # noqa: E402
from sib_fast.backends.triton.plan import planned_for, projection_plan, tunables  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")

@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_the_float64_contract(case):
    B, C, H, W, features, layout, dtype, x_grad = case
    R, x, mask = maps(B, C, H, W, dtype, seed=B + H, device=DEVICE, layout=layout)
    compare_projection(tb.masked_projection, R, x, mask, features, seed=12345 + features, x_grad=x_grad,
                       what="triton")


# (B, C, H, W, window, features, dtype): the whole head, sib_terms(backend="triton", hsic_features=F)
END_TO_END = [(2, 3, 1, 1, 31, 7, torch.float32), (3, 1, 5, 5, 3, 64, torch.float64),
              (2, 3, 5, 7, 31, 512, torch.bfloat16), (3, 3, 6, 5, 3, 1, torch.float32)]


@pytest.mark.parametrize("case", END_TO_END, ids=lambda c: "x".join(map(str, c[:4])) + f"-k{c[4]}-F{c[5]}-{str(c[6])[6:]}")
def test_hsic_f_end_to_end_matches_the_reference(case):
    B, C, H, W, window, features, dtype = case
    R, x = random_maps(B, C, H, W, dtype, seed=features + H)
    compare_hsic_f_with_reference("triton", R.to(DEVICE), x.to(DEVICE), window, features, seed=31 * features + B,
                                  x_grad=features != 512)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the interpreter's emulated tensor-core rounding")
def test_plain_tf32_fails_the_tolerance():
    # the control of the emulated rounding: in plain tf32 the products are outside the tolerance,
    # so the cases above see the split of the 3xTF32 products, not exact float32 dots
    R, x, mask = maps(3, 3, 5, 7, seed=8)
    with tunables(DOT_PRECISION="tf32"), pytest.raises(AssertionError, match="relative error"):
        compare_projection(tb.masked_projection, R, x, mask, 64, seed=1, what="triton in plain tf32")


@pytest.mark.parametrize("use", ["proj", "sq"])
def test_each_output_alone(use):
    # only proj: the backward without the 2 gS u term (grad_sq None); only sq: grad_proj None
    R, x, mask = maps(3, 2, 4, 5, device=DEVICE, seed=3)
    compare_projection(tb.masked_projection, R, x, mask, 9, seed=7, use_proj=use == "proj", use_sq=use == "sq",
                       what=f"triton, {use} alone")


@pytest.mark.parametrize("seed", UNIT_IMAGE_SEEDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_unit_images_project_to_the_rows_of_w(seed, dtype):
    check_unit_images(tb.masked_projection, seed, dtype, DEVICE)


def test_keys_take_both_signs():
    # the seeds above reach negative int32 keys (bits >= 2^31), or the test would not cover them
    signs = {k < 0 for seed in UNIT_IMAGE_SEEDS for k in _signed_keys(seed)}
    assert signs == {True, False}


def test_seeds_give_different_projections():
    R, x, mask = maps(2, 1, 3, 3, device=DEVICE)
    a, _ = tb.masked_projection(R, x, mask, 8, 1)
    b, _ = tb.masked_projection(R, x, mask, 8, 2)
    assert not torch.allclose(a, b)


def test_several_chunks_f_blocks_and_image_blocks():
    # B = 20 in image blocks of 16, 35 pairs in F blocks of 16, and chunks of d planned for a GPU
    # of 4 multiprocessors: the partials of several chunks summed, each image block its own W pass
    with tunables(PROJ_IMAGE_BLOCK=16, PROJ_TILE=(16, 16), PROJ_BWD_TILE=(16, 16)), planned_for(4, (9, 0)):
        plan = projection_plan(20, 2, 21, 70, DEVICE)
        assert plan.nbb == 2 and plan.n_fblocks == 3 and plan.chunks > 1 and plan.blocks_per_chunk > 1
        R, x, mask = maps(20, 2, 3, 7, device=DEVICE, seed=4)
        compare_projection(tb.masked_projection, R, x, mask, 70, seed=99, what="triton, several blocks")


def test_repeated_runs_are_bitwise_equal():
    R, x, mask = maps(3, 3, 4, 5, device=DEVICE, seed=5)
    gp, gs = upstream(3, 7, 0, DEVICE)
    results = []
    for _ in range(2):
        R_, x_, m_ = (t.clone().requires_grad_() for t in (R, x, mask))
        proj, sq = tb.masked_projection(R_, x_, m_, 7, 3)
        results.append((proj, sq, *torch.autograd.grad((proj * gp.float()).sum() + (sq * gs.float()).sum(),
                                                       (R_, x_, m_))))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on NaN
def test_nan_in_r_propagates_to_its_image():
    R, x, mask = maps(3, 2, 4, 3, device=DEVICE, seed=6)
    R[1, 1, 2, 0] = float("nan")
    proj, sq = tb.masked_projection(R, x, mask, 7, 5)
    assert torch.isnan(proj[0, 1]).all() and torch.isnan(sq[0, 1])
    # the other images and x's projections are those of the contract
    ref_proj, ref_sq, _ = contract(R, x, mask, 7, 5)
    keep = torch.tensor([0, 2])
    torch.testing.assert_close(proj[0, keep].cpu().double(), ref_proj[0, keep].detach().cpu(), rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(proj[1].cpu().double(), ref_proj[1].detach().cpu(), rtol=2e-5, atol=1e-6)


def test_no_d_by_f_allocation():
    # the launches record every buffer: nothing the size of W (D x F) is ever allocated
    R, x, mask = maps(2, 3, 8, 8, device=DEVICE)
    with record_launches(execute=False) as calls:
        launch_projection_forward(R, x, mask, 512, 1)
    D = 3 * 8 * 8
    sizes = [a.numel() for call in calls for a in call.args if isinstance(a, torch.Tensor)]
    assert sizes and max(sizes) < D * 512 / 4, sizes


def test_bad_inputs_raise():
    R, x, mask = maps(2, 3, 4, 5, device=DEVICE)
    with pytest.raises(ValueError, match="mask"):
        tb.masked_projection(R, x, mask[:, :3], 7, 1)
    with pytest.raises(ValueError, match="features"):
        tb.masked_projection(R, x, mask, 0, 1)


def test_opcheck():
    R, x, mask = maps(2, 3, 3, 4, torch.float64, device=DEVICE)
    torch.library.opcheck(tb.projection_forward, (R.requires_grad_(), x.requires_grad_(), mask.requires_grad_(), 7,
                                                  11))
    gp, gs = upstream(2, 7, 0, DEVICE)
    torch.library.opcheck(tb.projection_backward, (gp, gs, R.detach(), x.detach(), mask.detach(), 7, 11, True))
    torch.library.opcheck(tb.projection_backward, (gp, None, R.detach(), x.detach(), mask.detach(), 7, 11, False))


def test_refuses_a_second_derivative():
    R, x, mask = maps(2, 1, 3, 3, device=DEVICE)
    R = R.requires_grad_()
    proj, sq = tb.masked_projection(R, x, mask, 5, 1)
    (g,) = torch.autograd.grad(proj.sum() + sq.sum(), R, create_graph=True)
    with pytest.raises(RuntimeError, match="backend='reference'"):
        torch.autograd.grad((g * g).sum(), R)


# ---------------------------------------------------------------------------------------------
# GPU only
# ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("B,dtype", [(16, torch.float32), (128, torch.float32), (16, torch.bfloat16)],
                         ids=["16-float32", "128-float32", "16-bfloat16"])
def test_gpu_target_shape(B, dtype):
    # the shape, 3x224x224 at F = 512 (W materialised in float64 for the contract: 0.6 GB)
    R, x, mask = maps(B, 3, 224, 224, dtype, seed=9, device=DEVICE)
    compare_projection(tb.masked_projection, R, x, mask, 512, seed=2024, what=f"triton B={B}")


@pytest.mark.gpu
def test_gpu_channels_last_and_odd_features():
    R, x, mask = maps(5, 3, 37, 29, device=DEVICE, layout="channels_last", seed=10)
    compare_projection(tb.masked_projection, R, x, mask, 77, seed=5, what="triton channels_last")


@pytest.mark.gpu
def test_gpu_repeated_runs_are_bitwise_equal():
    R, x, mask = maps(32, 3, 224, 224, seed=11, device=DEVICE)
    gp, gs = upstream(32, 512, 0, DEVICE)
    results = []
    for _ in range(2):
        R_, x_, m_ = (t.clone().requires_grad_() for t in (R, x, mask))
        proj, sq = tb.masked_projection(R_, x_, m_, 512, 3)
        results.append((proj, sq, *torch.autograd.grad((proj * gp.float()).sum() + (sq * gs.float()).sum(),
                                                       (R_, x_, m_))))
    for a, b in zip(*results):
        assert torch.equal(a, b)
