"""esper_gym.bench.stats: rliable's IQM and P(improvement), stratified bootstrap CIs, paired
differences, performance profiles, overlap logic."""

import numpy as np
import pandas as pd
import pytest
from rliable import metrics as rly_metrics
from scipy.stats import trim_mean

from esper_gym.bench.stats import (
    ALL_TASKS,
    _poi,
    iqm,
    markdown_table,
    overlap_matrix,
    overlaps,
    paired_difference,
    performance_profile,
    probability_of_improvement,
    stratified_bootstrap_ci,
    summarize,
)

# --- IQM ---------------------------------------------------------------------------------------


def test_iqm_of_four_is_the_mean_of_the_middle_two():
    assert iqm([1.0, 2.0, 3.0, 100.0]) == pytest.approx(2.5)
    assert iqm([100.0, 3.0, -50.0, 2.0]) == pytest.approx(2.5)  # order does not matter


def test_iqm_of_multiples_of_four_drops_whole_quarters():
    x = np.arange(8.0)  # middle 50%: 2, 3, 4, 5
    assert iqm(x) == pytest.approx(3.5)
    x = np.array([0, 0, 0, 10, 20, 1000, 1000, 1000.0])  # middle 50%: 0, 10, 20, 1000
    assert iqm(x) == pytest.approx(np.mean([0, 10, 20, 1000]))


@pytest.mark.parametrize("n", [1, 2, 3, 5, 6, 7, 10, 13])
def test_iqm_is_rliables_and_scipys_trim_mean(n):
    # The definition published IQMs use: int(n/4) values cut whole from each end. With n = 5
    # that is the mean of the middle three (the old fractional trimming gave 0.3/0.4/0.3).
    x = np.random.default_rng(n).normal(size=n)
    assert iqm(x) == pytest.approx(trim_mean(x, 0.25))
    assert iqm(x) == pytest.approx(rly_metrics.aggregate_iqm(x[:, None]))
    assert iqm([10.0, 1.0, 2.0, 4.0, -10.0]) == pytest.approx((1 + 2 + 4) / 3)


def test_iqm_small_samples_and_constants():
    assert iqm([7.0]) == 7.0
    assert iqm([1.0, 3.0]) == pytest.approx(2.0)
    assert iqm([0.0, 3.0, 6.0]) == pytest.approx(3.0)  # n < 4: nothing cut
    assert iqm(np.full(9, 0.42)) == pytest.approx(0.42)


def test_iqm_is_robust_to_one_outlier_unlike_the_mean():
    x = np.array([0.80, 0.81, 0.82, 0.83, 0.84, 0.85, 0.86, 0.87])
    bad = x.copy()
    bad[-1] = -100.0
    assert abs(iqm(bad) - iqm(x)) < 0.02
    assert abs(bad.mean() - x.mean()) > 10


def test_iqm_along_an_axis_matches_row_by_row():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 7))
    assert np.allclose(iqm(a, axis=1), [iqm(row) for row in a])
    assert np.allclose(iqm(a, axis=0), [iqm(col) for col in a.T])


def test_iqm_rejects_empty():
    with pytest.raises(ValueError, match="empty"):
        iqm([])


# --- bootstrap ---------------------------------------------------------------------------------


def test_bootstrap_ci_contains_the_iqm_and_is_deterministic():
    rng = np.random.default_rng(1)
    for n in (3, 5, 10, 30):
        x = rng.normal(0.8, 0.05, size=n)
        ci = stratified_bootstrap_ci([x], reps=2000, seed=3)
        assert ci.estimate == pytest.approx(iqm(x))
        assert ci.lo <= ci.estimate <= ci.hi
        assert x.min() - 1e-12 <= ci.lo and ci.hi <= x.max() + 1e-12  # weights sum to 1 +- ulp
        assert stratified_bootstrap_ci([x], reps=2000, seed=3) == ci


def test_bootstrap_ci_shrinks_with_more_seeds():
    rng = np.random.default_rng(2)
    widths = []
    for n in (5, 20, 80, 320):
        x = rng.normal(0.0, 1.0, size=n)
        ci = stratified_bootstrap_ci([x], reps=2000, seed=0)
        widths.append(ci.hi - ci.lo)
    assert widths == sorted(widths, reverse=True)
    assert widths[-1] < widths[0] / 4  # ~1/sqrt(n): 16x the seeds, about 1/4 the width


def test_a_constant_sample_has_a_zero_width_interval():
    ci = stratified_bootstrap_ci([[0.5] * 5])
    assert (ci.lo, ci.estimate, ci.hi) == (0.5, 0.5, 0.5)


def test_stratified_bootstrap_keeps_each_task_in_every_resample():
    # Two tasks on very different scales. Pooled resampling could draw all values from one task
    # and swing the IQM between ~0 and ~100; resampling within tasks cannot: every resample has
    # 4 values of each, so its IQM is the mean of the top of task a and the bottom of task b.
    a = np.array([0.0, 0.1, 0.2, 0.3])
    b = np.array([100.0, 100.1, 100.2, 100.3])
    ci = stratified_bootstrap_ci([a, b], reps=4000, seed=0)
    assert ci.estimate == pytest.approx(iqm(np.concatenate([a, b])))
    assert ci.lo >= iqm(np.r_[a.min().repeat(4), b.min().repeat(4)]) - 1e-9
    assert ci.hi <= iqm(np.r_[a.max().repeat(4), b.max().repeat(4)]) + 1e-9
    pooled_like = stratified_bootstrap_ci([np.concatenate([a, b])], reps=4000, seed=0)
    assert (pooled_like.hi - pooled_like.lo) > 10 * (ci.hi - ci.lo)


def test_bootstrap_rejects_bad_arguments():
    with pytest.raises(ValueError):
        stratified_bootstrap_ci([[1.0], []])
    with pytest.raises(ValueError):
        stratified_bootstrap_ci([[1.0]], confidence=1.0)


# --- overlap -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ((0, 1), (2, 3), False),
        ((0, 2), (1, 3), True),
        ((0, 1), (1, 2), True),  # touching closed intervals share a point
        ((0, 10), (3, 4), True),  # nested
        ((2, 3), (0, 1), False),
    ],
)
def test_overlaps(a, b, expected):
    assert overlaps(a, b) is expected
    assert overlaps(b, a) is expected


def _episodes(values: dict) -> pd.DataFrame:
    rows = []
    for (task, agent), accs in values.items():
        for seed, acc in enumerate(accs):
            rows.append(
                {
                    "task": task,
                    "agent": agent,
                    "seed": seed,
                    "test_acc": acc,
                    "val_acc": acc,
                    "params_added": 100 * seed,
                    "return": acc * 10,
                }
            )
    return pd.DataFrame(rows)


def test_summarize_marks_the_best_agent_and_which_intervals_overlap():
    df = _episodes(
        {
            ("t1", "good"): [0.90, 0.91, 0.92, 0.93, 0.94],
            ("t1", "close"): [0.89, 0.90, 0.91, 0.92, 0.93],
            ("t1", "bad"): [0.50, 0.51, 0.52, 0.53, 0.54],
            ("t2", "good"): [0.70, 0.71, 0.72, 0.73, 0.74],
            ("t2", "close"): [0.60, 0.61, 0.62, 0.63, 0.64],
            ("t2", "bad"): [0.10, 0.11, 0.12, 0.13, 0.14],
        }
    )
    s = summarize(df, reps=1000).set_index(["task", "agent"])
    assert s.loc[("t1", "good"), "vs_best"] == "best"
    assert s.loc[("t1", "close"), "vs_best"] == "overlaps"
    assert s.loc[("t1", "bad"), "vs_best"] == "separate"
    assert s.loc[("t2", "close"), "vs_best"] == "separate"
    assert s.loc[("t1", "good"), "test_acc_iqm"] == pytest.approx(0.92)
    assert s.loc[("t1", "good"), "n"] == 5
    # One all-tasks row per agent: IQM of the 10 pooled values.
    pooled = np.r_[np.arange(0.90, 0.945, 0.01), np.arange(0.70, 0.745, 0.01)]
    assert s.loc[(ALL_TASKS, "good"), "test_acc_iqm"] == pytest.approx(iqm(pooled))
    assert s.loc[(ALL_TASKS, "good"), "n"] == 10
    m = overlap_matrix(s.reset_index(), "t1")
    assert m.loc["good", "close"] and not m.loc["good", "bad"] and m.loc["bad", "bad"]


def test_a_privileged_agent_is_never_the_best():
    df = _episodes(
        {
            ("t1", "oracle"): [0.95, 0.96, 0.97],
            ("t1", "good"): [0.90, 0.91, 0.92],
            ("t1", "bad"): [0.50, 0.51, 0.52],
        }
    )
    s = summarize(df, reps=500, privileged=["oracle"]).set_index(["task", "agent"])
    assert s.loc[("t1", "good"), "best"] and not s.loc[("t1", "oracle"), "best"]
    assert s.loc[("t1", "oracle"), "vs_best"] == "separate"  # compared with the best competitor
    assert summarize(df, reps=500).set_index(["task", "agent"]).loc[("t1", "oracle"), "best"]


def test_agents_not_run_on_every_task_get_no_all_tasks_row():
    df = _episodes({("t1", "a"): [0.1, 0.2], ("t2", "a"): [0.3, 0.4], ("t1", "b"): [0.5, 0.6]})
    s = summarize(df, reps=100)
    assert list(s[s["task"] == ALL_TASKS]["agent"]) == ["a"]


def test_markdown_table_has_one_row_per_summary_row_and_the_footnote():
    df = _episodes({("t1", "a"): [0.1, 0.2, 0.3], ("t1", "b"): [0.8, 0.9, 0.95]})
    s = summarize(df, reps=200)
    md = markdown_table(s)
    rows = [line for line in md.splitlines() if line.startswith("| t1")]
    assert len(rows) == 2
    assert "**b**" in rows[1] and "best" in rows[1]
    assert "separate" in rows[0]
    assert "stratified bootstrap" in md


# --- probability of improvement, paired differences, profiles ----------------------------------


def test_vectorised_poi_equals_rliables():
    rng = np.random.default_rng(4)
    for n, m in ((5, 5), (3, 7), (10, 4)):
        x, y = rng.integers(0, 4, n).astype(float), rng.integers(0, 4, m).astype(float)  # ties
        assert _poi(x, y) == pytest.approx(
            rly_metrics.probability_of_improvement(x[:, None], y[:, None])
        )


def test_p_improvement_of_a_dominating_agent_is_one():
    x = [[1.0, 1.1, 1.2, 1.3, 1.4], [5.0, 5.1, 5.2]]
    y = [[0.0, 0.1, 0.2, 0.3, 0.4], [4.0, 4.1, 4.2]]
    ci = probability_of_improvement(x, y, reps=500)
    assert (ci.estimate, ci.lo, ci.hi) == (1.0, 1.0, 1.0)
    back = probability_of_improvement(y, x, reps=500)
    assert (back.estimate, back.lo, back.hi) == (0.0, 0.0, 0.0)
    same = probability_of_improvement([[1.0, 2.0, 3.0]], [[1.0, 2.0, 3.0]], reps=500)
    assert same.estimate == pytest.approx(0.5) and same.lo < 0.5 < same.hi
    with pytest.raises(ValueError, match="same tasks"):
        probability_of_improvement(x, y[:1])


def test_paired_ci_is_narrower_than_unpaired_on_correlated_seeds():
    # The seed (context, init) moves both agents by up to +-1; agent a is 0.1 better on each.
    rng = np.random.default_rng(0)
    shared = rng.normal(0.0, 1.0, 12)
    a = shared + 0.1 + rng.normal(0, 0.01, 12)
    b = shared
    ci_a = stratified_bootstrap_ci([a], reps=2000)
    ci_b = stratified_bootstrap_ci([b], reps=2000)
    assert ci_a.overlaps(ci_b)  # unpaired: cannot tell them apart
    paired = paired_difference([a - b], reps=2000)
    assert paired.estimate == pytest.approx(np.mean(a - b))
    assert 0.08 < paired.lo < paired.hi < 0.12  # paired: a is better, and by about 0.1
    assert (paired.hi - paired.lo) < 0.05 * min(ci_a.hi - ci_a.lo, ci_b.hi - ci_b.lo)


def test_performance_profile_counts_runs_above_each_threshold():
    prof, lo, hi = performance_profile([[1.0, 2.0, 3.0, 4.0]], [0.0, 1.5, 3.5, 5.0], reps=300)
    assert prof.tolist() == [1.0, 0.75, 0.25, 0.0]
    assert np.all(lo <= prof) and np.all(prof <= hi)
    assert (lo[0], hi[0], lo[-1], hi[-1]) == (1.0, 1.0, 0.0, 0.0)


def test_summarize_compares_with_the_strongest_non_privileged_baseline():
    # Per seed: a shared offset; "agent" = "strong" + 0.5 on every seed, "weak" below both.
    off = [0.0, 3.0, -2.0, 1.0, 5.0]
    df = _episodes(
        {
            ("t1", "agent"): [o + 0.5 for o in off],
            ("t1", "strong"): off,
            ("t1", "weak"): [o - 1.0 for o in off],
            ("t1", "oracle"): [o + 9.0 for o in off],
        }
    )
    s = summarize(df, reps=500, baselines=["strong", "weak"]).set_index(["task", "agent"])
    row = s.loc[("t1", "agent")]
    assert row["reference"] == "strong"  # the oracle is not a baseline: never the reference
    assert row["paired_diff"] == pytest.approx(5.0)  # return = 10 x test_acc
    assert row["paired_lo"] == pytest.approx(5.0) and row["paired_hi"] == pytest.approx(5.0)
    assert row["paired_n"] == 5
    assert 0.5 < row["p_improve"] < 1.0  # unpaired: the seed offsets blur the comparison
    assert np.isnan(s.loc[("t1", "strong"), "paired_diff"])
    assert s.loc[("t1", "weak"), "paired_diff"] == pytest.approx(-10.0)
    assert s.loc[("t1", "oracle"), "p_improve"] == pytest.approx(1.0)
    md = markdown_table(s.reset_index())
    assert "P(> reference)" in md and "5.00 [5.00, 5.00]" in md
