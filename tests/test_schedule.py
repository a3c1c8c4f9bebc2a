"""The learning-rate schedules of ``sib-train`` (``sib_fast.training.schedule``): the rate of each
step, the checks of their arguments, and a run whose optimizer took those rates."""
import json
import math

import pytest
import torch

from sib_fast import train
from sib_fast.training import schedule
from sib_fast.training.checkpoint import CHECKPOINT
from sib_fast.training.history import METRICS

from cli_runs import TINY, _restore_threads  # noqa: F401  (an autouse fixture)


def _args(*argv):
    args = train.build_parser().parse_args(list(argv))
    schedule.check(args)
    return args


def test_constant_with_a_warmup_of_a_fraction_of_an_epoch():
    s = schedule.from_args(_args("--lr", "0.1", "--warmup-epochs", "0.5", "--epochs", "2"), steps_per_epoch=8)
    assert s.warmup_steps == 4
    assert [s.lr(i) for i in range(6)] == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1])
    assert schedule.from_args(_args("--lr", "0.1"), 8).lr(0) == 0.1  # no warmup: --lr from the first step


def test_cosine_falls_from_lr_after_the_warmup_to_zero_at_the_end():
    s = schedule.from_args(_args("--lr", "1", "--lr-schedule", "cosine", "--warmup-epochs", "1", "--epochs", "3"), 10)
    rates = [s.lr(i) for i in range(30)]
    assert rates[9] == 1 and rates[10] == 1 and rates[20] == pytest.approx(0.5)
    assert all(a >= b for a, b in zip(rates[10:], rates[11:])) and 0 < rates[-1] < 0.01
    assert rates[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 19 / 20)))


def test_step_multiplies_by_gamma_at_each_milestone():
    s = schedule.from_args(_args("--lr", "1", "--lr-schedule", "step", "--lr-step-epochs", "1.5,3",
                                 "--lr-gamma", "0.5", "--epochs", "4"), 4)
    assert s.milestone_steps() == [6, 12]
    assert [s.lr(i) for i in (0, 5, 6, 11, 12, 15)] == [1, 1, 0.5, 0.5, 0.25, 0.25]
    # default: a third and two thirds of the run, gamma 0.1 (ImageNet's 30 and 60 of 90)
    args = _args("--lr-schedule", "step", "--epochs", "90")
    assert args.lr_step_epochs == [30, 60] and args.lr_gamma == 0.1
    assert schedule.from_args(args, 1).record()["milestone_steps"] == [30, 60]


@pytest.mark.parametrize("argv, words", [
    (["--warmup-epochs", "4"], ["--warmup-epochs (4) must be less than --epochs (4)"]),
    (["--warmup-epochs", "-1"], ["--warmup-epochs", ">= 0"]),
    (["--warmup-epochs", "nan"], ["--warmup-epochs"]),
    (["--lr-step-epochs", "2"], ["apply to --lr-schedule step only"]),
    (["--lr-gamma", "0.5", "--lr-schedule", "cosine"], ["apply to --lr-schedule step only"]),
    (["--lr-schedule", "step", "--lr-gamma", "0"], ["--lr-gamma must be in (0, 1)"]),
    (["--lr-schedule", "step", "--lr-gamma", "1.5"], ["--lr-gamma must be in (0, 1)"]),
    (["--lr-schedule", "step", "--lr-step-epochs", "5"], ["before --epochs (4), got 5"]),
    (["--lr-schedule", "step", "--lr-step-epochs", "2,1"], ["must increase, got 2,1"]),
    (["--lr-schedule", "step", "--lr-step-epochs", "1,x"], ["comma-separated", "'x'"]),
    (["--lr-schedule", "step", "--warmup-epochs", "2", "--lr-step-epochs", "1"], ["after the warmup (2)"]),
])
def test_bad_schedule_arguments_are_one_line(tmp_path, capsys, argv, words):
    assert train.main([*argv, "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("sib-train: error: "), err
    for w in words:
        assert w in err, (argv, err)
    assert not (tmp_path / "out").exists()


def test_the_optimizer_takes_the_scheduled_rate_at_every_step(tmp_path):
    out = tmp_path / "run"
    code = train.main([*TINY, "--train-samples", "32", "--epochs", "2", "--arch", "tiny_cnn", "--no-sib",
                       "--lr", "0.01", "--lr-schedule", "step", "--lr-step-epochs", "1.5", "--lr-gamma", "0.5",
                       "--warmup-epochs", "0.5", "--output", str(out)])
    assert code == 0
    records = [json.loads(line) for line in (out / METRICS).read_text().splitlines()]
    assert [r["lr"] for r in records] == [0.01, 0.005]  # the last step of each epoch: 4 steps an epoch
    ckpt = torch.load(out / CHECKPOINT, weights_only=True)
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == 0.005
    assert ckpt["lr_schedule"] == dict(name="step", base_lr=0.01, steps_per_epoch=4, epochs=2, warmup_steps=2,
                                       milestone_steps=[6], gamma=0.5)
