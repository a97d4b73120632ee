"""MkDocs hooks: tables generated from committed result files, and result figures in the site.

A page asks for a generated table with an HTML comment on a line of its own:

    <!-- table: tamiyo_paired -->

which this hook replaces by the Markdown table `TABLES["tamiyo_paired"]()` builds from the
committed files under results/ (and conf/ for the tuned baselines). On a git host the comment
is invisible and the link next to it leads to the file. `tests/test_docs.py` imports this module
to check that the README's copy of the headline table is the generated one.

Links from docs/ to ../results/... (which resolve on a git host and in a clone) are rewritten to
results/..., and the files they name are added to the site, so the built site shows them too.
"""

from __future__ import annotations

import csv
import pathlib
import re

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^<!-- table: (\w+) -->$", re.MULTILINE)
RESULT_LINK = re.compile(r"\]\(\.\./((?:results|conf)/[^)#\s]+)")


def _rows(path: str) -> list[dict[str, str]]:
    with open(ROOT / path, newline="") as f:
        return list(csv.DictReader(f))


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _ci(mid: float, lo: float, hi: float, digits: int = 2, sign: bool = True) -> str:
    f = (lambda v: f"{v:+.{digits}f}") if sign else (lambda v: f"{v:.{digits}f}")
    return f"{f(mid)} [{f(lo)}, {f(hi)}]"


def headroom() -> str:
    """Static host, ceiling and heuristic per test context (results/contexts/headroom_*.csv)."""
    rows = []
    for task in ("spirals", "fashion_mnist"):
        for r in _rows(f"results/contexts/headroom_{task}.csv"):
            rows.append(
                [
                    r["task"],
                    f"{r['context_index']}: {r['context']}",
                    f"{float(r['static_test_acc']):.2f}",
                    f"{float(r['ceiling_test_acc']):.2f}",
                    f"{float(r['heuristic_test_acc']):.2f}",
                    f"{float(r['headroom']):+.2f}",
                    f"{float(r['heuristic_gain']):+.2f}",
                ]
            )
    header = ["task", "context", "static", "ceiling", "heuristic", "headroom", "heuristic gain"]
    return _table(header, rows)


def _paired(path: str) -> str:
    """Paired return difference of the three Tamiyo runs against the others (a paired.csv of
    experiments/paired_table.py)."""
    cells: dict[tuple[str, str], dict[str, str]] = {}
    for r in _rows(path):
        if r["metric"] == "return":
            cell = _ci(float(r["diff"]), float(r["lo"]), float(r["hi"]))
            cells.setdefault((r["task"], r["other"]), {})[r["agent"]] = cell
    agents = ["tamiyo0", "tamiyo1", "tamiyo2"]
    rows = [[task, other, *(c[a] for a in agents)] for (task, other), c in cells.items()]
    return _table(["task", "against", *agents], rows)


def tamiyo_paired() -> str:
    """The three Tamiyo runs against the baselines, on the same 12 test seeds."""
    return _paired("results/tamiyo/test_contexts/paired.csv")


def pace_paired() -> str:
    """Tamiyo behind the schedule gate on spirals_pace, 24 test contexts x 8 seeds; CIs over
    episodes (results/tamiyo_pace/test_contexts/paired.csv)."""
    return _paired("results/tamiyo_pace/test_contexts/paired.csv")


def pace_paired_contexts() -> str:
    """The same differences, CIs resampling whole contexts (paired_by_context.csv)."""
    return _paired("results/tamiyo_pace/test_contexts/paired_by_context.csv")


# The family gates' runs (results/tamiyo_pace/{plans,counts}/README.md): folder, steps, agents,
# label[, the first agent's training seed (0 if absent)].
PLANS_RUNS = [
    ("steps98k", "98,304", [f"tamiyo{i}" for i in range(3)], ""),
    ("steps196k", "196,608", [f"tamiyo{i}" for i in range(3)], ""),
    ("steps294k", "294,912", [f"tamiyo{i}" for i in range(3)], ""),
    ("steps294k", "294,912", [f"tamiyo{i}" for i in range(3, 6)], ", ent_coef 0.03"),
    ("steps294k/greedy", "294,912", [f"tamiyo{i}" for i in range(3)], ", greedy"),
]
COUNTS_RUNS = [
    ("steps294k/greedy", "294,912", [f"tamiyo{i}" for i in range(3)], ", greedy"),
    ("steps294k", "294,912", [f"tamiyo{i}" for i in range(3)], ", sampled"),
    ("more_seeds", "294,912", [f"tamiyo{i}" for i in range(3, 6)], ", greedy", 3),
]


def _gate_runs(gate: str, runs: list) -> str:
    rows = []
    for folder, steps, agents, label, *first in runs:
        base = f"results/tamiyo_pace/{gate}/{folder}"
        cells = {}
        for name in ("paired", "paired_by_context"):
            for r in _rows(f"{base}/{name}.csv"):
                if r["metric"] == "return":
                    ci = _ci(float(r["diff"]), float(r["lo"]), float(r["hi"]))
                    cells[name, r["agent"], r["other"]] = ci
        share = {
            r["agent"]: float(r["oracle_gap_share"]) for r in _rows(f"{base}/oracle_share.csv")
        }
        for seed, agent in enumerate(agents, start=first[0] if first else 0):
            rows.append(
                [
                    f"seed {seed}, {steps} steps{label}",
                    cells["paired", agent, "reactive"],
                    cells["paired_by_context", agent, "reactive"],
                    cells["paired_by_context", agent, "schedule"],
                    f"{share[agent]:.2f}",
                ]
            )
    header = [
        "run",
        "vs reactive (episodes)",
        "vs reactive (contexts)",
        "vs schedule (contexts)",
        "oracle share",
    ]
    return _table(header, rows)


def pace_plans() -> str:
    """Tamiyo behind the plan-family gate on spirals_pace against the reactive rule and the
    schedule (CIs over episodes and over contexts), with its share of the oracle's advantage
    (results/tamiyo_pace/plans/*/paired.csv, paired_by_context.csv, oracle_share.csv)."""
    return _gate_runs("plans", PLANS_RUNS)


def pace_counts() -> str:
    """The same for Tamiyo behind the count gate (results/tamiyo_pace/counts/)."""
    return _gate_runs("counts", COUNTS_RUNS)


def tamiyo_unpaired() -> str:
    """IQM [95% CI] of return and test accuracy per agent on the 12 test seeds
    (results/tamiyo/test_contexts/summary.csv)."""
    summary = [r for r in _rows("results/tamiyo/test_contexts/summary.csv")]
    tasks = ["spirals", "fashion_mnist"]
    by = {(r["task"], r["agent"]): r for r in summary}
    agents = [r["agent"] for r in summary if r["task"] == tasks[0]]
    rows = []
    for agent in agents:
        row = [agent + (" †" if by[(tasks[0], agent)]["privileged"] == "True" else "")]
        for task in tasks:
            r = by[(task, agent)]
            row.append(
                _ci(
                    float(r["return_iqm"]), float(r["return_lo"]), float(r["return_hi"]), sign=False
                )
            )
            acc = [100 * float(r[f"test_acc_{k}"]) for k in ("iqm", "lo", "hi")]
            row.append(_ci(*acc, digits=1, sign=False))
        rows.append(row)
    header = ["agent"] + [f"{t} {m}" for t in tasks for m in ("return", "test acc. %")]
    return _table(header, rows)


def _value_of_reacting(path: str) -> str:
    rows = []
    for r in _rows(path):
        if r["agent"] == "oracle" and r["value_of_reacting"]:
            v = [
                float(r[k])
                for k in ("value_of_reacting", "value_of_reacting_lo", "value_of_reacting_hi")
            ]
            rows.append(
                [
                    r["task"],
                    _ci(*v, digits=3 if abs(v[0]) < 0.05 else 2),
                    r["value_of_reacting_n"].split(".")[0],
                ]
            )
    return _table(["task", "value of reacting (oracle − schedule), mean [95% CI]", "seeds"], rows)


def reacting_baselines() -> str:
    """Value of reacting on the baselines run (results/baselines_test/summary.csv)."""
    return _value_of_reacting("results/baselines_test/summary.csv")


def reacting_pace() -> str:
    """Value of reacting on spirals_pace's 24 test contexts x 8 seeds (results/tamiyo_pace)."""
    return _value_of_reacting("results/tamiyo_pace/test_contexts/summary.csv")


def reacting_tamiyo() -> str:
    """Value of reacting on the Tamiyo evaluation's 12 seeds (results/tamiyo/test_contexts)."""
    return _value_of_reacting("results/tamiyo/test_contexts/summary.csv")


def tuned_baselines() -> str:
    """The tuned plans and rule parameters, with their mean train return and NoOp's on the same
    train episodes (conf/schedule_plans.yaml, conf/rule_params.yaml)."""
    plans = yaml.safe_load((ROOT / "conf/schedule_plans.yaml").read_text())
    rules = yaml.safe_load((ROOT / "conf/rule_params.yaml").read_text())
    rows = []
    for task, entry in plans.items():
        plan = ", ".join(f"{g['blueprint']} at {g['at']} ({g['layer']})" for g in entry["plan"])
        rows.append(
            [
                task,
                "schedule",
                plan,
                f"{entry['size']} plans x {len(entry['seeds'])} seeds",
                f"{entry['mean_return']:.2f}",
                f"{entry['noop_mean_return']:.2f}",
            ]
        )
    for task, by_rule in rules.items():
        for rule, entry in by_rule.items():
            params = ", ".join(f"{k} {v}" for k, v in entry["params"].items())
            searched = (
                f"{entry['size']} settings x {len(entry['seeds'])} seeds"
                if entry.get("tuned")
                else "not tuned"
            )
            rows.append(
                [
                    task,
                    rule,
                    params,
                    searched,
                    f"{entry['mean_return']:.2f}",
                    f"{entry['noop_mean_return']:.2f}",
                ]
            )
    header = [
        "task",
        "agent",
        "plan or parameters",
        "searched",
        "mean train return",
        "NoOp, same episodes",
    ]
    return _table(header, rows)


TABLES = {
    "headroom": headroom,
    "tamiyo_paired": tamiyo_paired,
    "pace_paired": pace_paired,
    "pace_paired_contexts": pace_paired_contexts,
    "pace_plans": pace_plans,
    "pace_counts": pace_counts,
    "tamiyo_unpaired": tamiyo_unpaired,
    "reacting_baselines": reacting_baselines,
    "reacting_tamiyo": reacting_tamiyo,
    "reacting_pace": reacting_pace,
    "tuned_baselines": tuned_baselines,
}


def expand(markdown: str) -> str:
    """The page's table markers replaced by the generated tables."""
    return MARKER.sub(lambda m: TABLES[m.group(1)](), markdown)


def on_page_markdown(markdown, page, config, files):
    return RESULT_LINK.sub(r"](\1", expand(markdown))


def on_files(files, config):
    from mkdocs.structure.files import File

    docs = pathlib.Path(config["docs_dir"])
    wanted = set()
    for page in docs.rglob("*.md"):
        wanted.update(RESULT_LINK.findall(page.read_text()))
    for path in sorted(wanted):
        if (ROOT / path).is_file() and files.get_file_from_path(path) is None:
            files.append(File(path, str(ROOT), config["site_dir"], config["use_directory_urls"]))
    return files
