"""sib-eval's report over seeds: t-intervals over a group's checkpoints and paired differences."""
import math

import pytest

from sib_fast.evaluation import report
from sib_fast.evaluation.localization import mean_t_interval


def test_mean_t_interval_against_hand_computed_values():
    mean, lo, hi = mean_t_interval([1.0, 2.0, 3.0])  # sd 1, t(2 df) = 4.303
    assert mean == 2.0 and hi - mean == pytest.approx(4.303 / math.sqrt(3))
    assert mean_t_interval([0.5, None, float("nan")]) == (0.5, 0.5, 0.5)
    assert all(math.isnan(v) for v in mean_t_interval([]))
    # past the table (30 df) the quantile keeps shrinking towards the normal's 1.96 from above
    _, lo40, hi40 = mean_t_interval([0.0, 1.0] * 20)
    half = (hi40 - lo40) / 2 / (math.sqrt(sum((v - 0.5) ** 2 for v in [0.0, 1.0] * 20) / 39) / math.sqrt(40))
    assert 1.96 < half < 2.042


def _runs(groups):
    runs, results = [], {}
    for group, per_seed in groups.items():
        for seed, (acc, epg) in per_seed.items():
            name = f"{group} s{seed}"
            runs.append(dict(name=name, group=group, args=dict(seed=seed), acc=(acc, acc, acc)))
            results[name] = dict(summary={"gradcam": {k: (epg, epg, epg) for k, _, _ in report.METRICS}})
    return runs, results


def test_group_means_intervals_and_paired_differences():
    runs, results = _runs({"base": {0: (0.9, 0.30), 1: (0.8, 0.20), 2: (0.7, 0.25)},
                           "sib": {0: (0.8, 0.40), 1: (0.7, 0.30), 2: (0.6, 0.35)}})
    lines = report._group_sections(runs, results, ["gradcam"])
    text = "\n".join(lines)
    assert "base: 3, sib: 3" in text
    row = next(ln for ln in lines if ln.startswith("| accuracy |") and "[" in ln)
    assert "0.800 [0.552, 1.048]" in row  # mean 0.8, sd 0.1, t 4.303 / sqrt(3)
    paired = lines[lines.index("### Paired difference from base"):]
    energy = next(ln for ln in paired if ln.startswith("| Energy pointing game | gradcam |"))
    assert "0.100 [0.100, 0.100]" in energy  # every seed gains exactly 0.1: an interval of width 0
    acc = next(ln for ln in paired if ln.startswith("| accuracy |"))
    assert "-0.100 [-0.100, -0.100]" in acc


def test_no_group_section_for_single_checkpoints_and_no_pairing_without_shared_seeds():
    runs, results = _runs({"base": {0: (0.9, 0.3)}, "sib": {0: (0.8, 0.4)}})
    assert report._group_sections(runs, results, ["gradcam"]) == []
    runs, results = _runs({"base": {0: (0.9, 0.3), 1: (0.8, 0.2)}, "sib": {5: (0.8, 0.4), 6: (0.7, 0.3)}})
    text = "\n".join(report._group_sections(runs, results, ["gradcam"]))
    assert "Over the checkpoints of each group" in text and "Paired difference" not in text
