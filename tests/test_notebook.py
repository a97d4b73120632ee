"""notebooks/compare_agents.ipynb runs top to bottom on a small results directory, so it
cannot rot: a renamed column or function in esper_gym.evaluate/stats/plots fails here."""

import json
import os
import pathlib

import nbformat
import numpy as np
import pandas as pd
from nbclient import NotebookClient

from esper_gym.bench.jobs import CSV_COLUMNS

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "compare_agents.ipynb"
COMPONENTS = ("accuracy", "param_cost", "latency_cost", "fault", "intervention")


def write_results(directory: pathlib.Path) -> None:
    """episodes.csv (the columns esper_gym.evaluate writes), events.jsonl and a training log:
    2 tasks x 3 agents x 4 seeds of made-up but well-formed episodes."""
    rng = np.random.default_rng(0)
    rows, events = [], []
    for task, base_acc in (("spirals", 0.7), ("fashion_mnist", 0.85)):
        for agent, gain, grow in (("heuristic", 0.05, 2000), ("random", 0.0, 1500), ("noop", 0, 0)):
            for seed in range(4):
                acc = base_acc + gain + rng.normal(0, 0.01)
                added = grow + int(rng.integers(0, 100)) if grow else 0
                row = dict.fromkeys(CSV_COLUMNS, 0)
                row |= {
                    "agent": agent,
                    "task": task,
                    "base_task": task,
                    "seed": seed,
                    "val_acc": acc,
                    "test_acc": acc - 0.01,
                    "host_params": 405,
                    "params": 405 + added,
                    "params_added": added,
                    "length": 32,
                    "diverged": False,
                    "wall_s": 3.0,
                    "n_layers": 3,
                    "layers": "fc0;fc1;fc2",
                    "seed_slots": 2,
                    "decision_interval": 20,
                    "budget_steps": 640,
                    "checkpoint": "",
                }
                row |= {f"reward/{c}": rng.normal(0, 0.1) for c in COMPONENTS}
                row["return"] = sum(row[f"reward/{c}"] for c in COMPONENTS)
                rows.append(row)
                if agent == "heuristic":
                    tag = {"agent": agent, "task": task, "seed": seed, "layer": "fc1", "slot": 0}
                    tag["blueprint"] = "residual_mlp"
                    for step, (a, b) in zip(
                        (40, 60, 200, 240, 300),
                        [
                            ("DORMANT", "GERMINATED"),
                            ("GERMINATED", "TRAINING"),
                            ("TRAINING", "BLENDING"),
                            ("BLENDING", "PROBATION"),
                            ("PROBATION", "FOSSILIZED"),
                        ],
                    ):
                        events.append(
                            {**tag, "step": step, "from": a, "to": b, "reason": "advance"}
                        )
    pd.DataFrame(rows).to_csv(directory / "episodes.csv", index=False)
    (directory / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    pd.DataFrame(
        {"global_step": np.arange(1, 9) * 256, "charts/episodic_return": rng.normal(size=8)}
    ).to_csv(directory / "train_metrics.csv", index=False)
    pd.DataFrame(
        {
            "task": ["spirals"],
            "agent": ["heuristic"],
            "reference": ["noop"],
            "paired_diff": [0.123],
            "paired_lo": [0.01],
            "paired_hi": [0.2],
            "oracle_gap_share": [0.4567],
        }
    ).to_csv(directory / "summary.csv", index=False)


def test_notebook_executes_and_shows_the_table_and_figures(tmp_path, monkeypatch):
    results = tmp_path / "results"
    results.mkdir()
    write_results(results)
    # As a user runs it from the repository root: a path relative to the root, while Jupyter
    # starts the kernel in notebooks/.
    monkeypatch.setenv("ESPER_RESULTS", os.path.relpath(results, ROOT))
    monkeypatch.setenv("ESPER_FIGURES", str(tmp_path / "figures"))
    monkeypatch.delenv("ESPER_SWEEP", raising=False)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        nb,
        timeout=120,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    ).execute()  # raises CellExecutionError on any failing cell

    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    markdown = [o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
    table = next(m for m in markdown if "| task | agent |" in m)
    for task in ("spirals", "fashion_mnist", "all tasks"):
        for agent in ("heuristic", "random", "noop"):
            assert f"| {task} | {agent} |" in table or f"| {task} | **{agent}** |" in table
    plain = " ".join(o.get("data", {}).get("text/plain", "") for o in outputs)
    assert "oracle_gap_share" in plain and "0.457" in plain  # the summary.csv comparison
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 3  # pareto, lifecycle, learning curve
    for name in ("pareto.png", "lifecycle.png", "learning_curves.png"):
        assert (tmp_path / "figures" / name).stat().st_size > 2000
