"""experiments/burst_order.py: the return the count gate's reordering alone moves."""

from tests.scripts import load_experiment

TINY = {"dataset_kwargs": {"n_train": 1024, "n_val": 256, "n_test": 256}, "eval_size": 256}


def test_only_reordered_plans_are_played_and_each_difference_is_paired(kernel_dir):
    burst_order = load_experiment("burst_order")
    effects = burst_order["order_effects"](
        "spirals_pace", "train", 1, n_contexts=1, kernel_dir=kernel_dir, **TINY
    )
    # The family's multi-seed plans (conf/schedule_plans.yaml): two low-rank at 0.25, two and
    # three residual MLPs at 0.5, three at 0 and 0.25; its one-seed plans are not reordered.
    assert [name.count(":") // 2 for name, _ in effects] == [2, 2, 3, 3, 3]
    assert all(len(diffs) == 1 for _, diffs in effects)
    # Two seeds one step apart in swapped layers: a small, nonzero difference in return.
    assert any(d != 0 for _, diffs in effects for d in diffs)
    assert all(abs(d) < 1.0 for _, diffs in effects for d in diffs)
