"""Every code block of README.md and docs/ runs, every relative link resolves, the README stays
short, and its headline table is the one generated from the committed results.

How a block runs (one test per block):

- ```python: as written, in a fresh subprocess from the repository root. The page's file
  blocks (below) are on PYTHONPATH. Identical blocks on several pages run once.
- ```bash: through bash, in a scratch folder holding a copy of `results/` and the page's file
  blocks, with PATH reduced to shims: `python`/`python3`/`esper-train`/`esper-evaluate` go
  through `shim()` below, every other command (`make`, `pip`, `git`, `cp`, ...) is "not found"
  and does nothing. Only `python -m esper_gym.*` commands run; `python experiments/...`
  scripts (minutes to hours each) are not run. In the default suite a command runs with small
  overrides appended (Hydra's last override wins: the tiny tasks of tests/conftest.py, one
  evaluation episode, no logger) when that is cheap: the baselines' training runs and the
  evaluations without checkpoints. A command that trains Tamiyo or loads a checkpoint is only
  composed (`--cfg job`: every key and value checked against the schemas, nothing trained);
  `esper_gym.validate` (it replays whole committed files) runs in the slow test only.
  `test_bash_block_as_written` (slow) runs each command exactly as written.
- File blocks: a ```python or ```yaml block whose first line is `# <path>` (`# mylab.py`) is a
  file the page's other blocks use; it is written, not run, and must be used by another block.
- ```text blocks hold committed output (pymdownx.snippets includes); they are not code.
- `<!-- not-run: reason -->` on the line before a block skips it, with its reason.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
README_LIMIT = 12_000

FENCE = re.compile(
    r"^(?P<indent>[ ]*)```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
    re.MULTILINE | re.DOTALL,
)
NOT_RUN = re.compile(r"^<!-- not-run: (?P<reason>\S.*?) -->$")
FILE_LINE = re.compile(r"^# (?P<path>[\w./-]+\.(?:py|yaml|yml))$")
COMMAND = re.compile(r"(?:python3? -m esper_gym\.\w+|esper-train|esper-evaluate)(?=\s|$)")
LANGS = {"python", "bash", "yaml", "text"}


@dataclasses.dataclass(frozen=True)
class Block:
    page: pathlib.Path
    line: int
    lang: str
    code: str
    not_run: str | None

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def file(self) -> str | None:
        first = self.code.split("\n", 1)[0]
        match = FILE_LINE.match(first)
        return match["path"] if match and self.lang in ("python", "yaml") else None


def _without_fences(text: str) -> str:
    return FENCE.sub("", text)


@functools.cache
def blocks(page: pathlib.Path) -> tuple[Block, ...]:
    text = page.read_text()
    found = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        before = [b.strip() for b in text[: match.start()].split("\n") if b.strip()]
        marker = NOT_RUN.match(before[-1]) if before else None
        indent = len(match["indent"])
        code = "\n".join(row[indent:] for row in match["body"].split("\n"))
        found.append(Block(page, line, match["lang"], code, marker["reason"] if marker else None))
    return tuple(found)


ALL = [b for page in PAGES for b in blocks(page)]
PYTHON = list({b.code: b for b in reversed(ALL) if b.lang == "python" and not b.file}.values())
PYTHON.sort(key=lambda b: (PAGES.index(b.page), b.line))
BASH = [b for b in ALL if b.lang == "bash"]


def ids(items):
    return [b.name for b in items]


# ------------------------------------------------------------------------- the pages


def test_readme_is_short():
    assert len(README.read_text()) <= README_LIMIT


def _links(text: str) -> list[str]:
    text = re.sub(r"`[^`\n]*`", "", _without_fences(text))
    return re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(r'src="([^"]+)"', text)


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_resolve(page):
    missing = []
    for link in _links(page.read_text()):
        if re.match(r"^[a-z]+:", link) or link.startswith("#"):
            continue
        target = (page.parent / link.split("#", 1)[0]).resolve()
        if not target.exists():
            missing.append(link)
    assert not missing, f"{page.relative_to(ROOT)} links to missing files: {missing}"


def test_every_block_is_code_the_tests_run_or_marked():
    for block in ALL:
        assert block.lang in LANGS, f"{block.name}: a ```{block.lang} block is never run"
        if block.lang == "yaml":
            assert block.file, f"{block.name}: a yaml block must be a file (`# <path>` first)"
        if block.lang == "text":  # committed output, embedded: no code in it
            assert "--8<--" in block.code, f"{block.name}: ```text is for embedded output only"
    marked = [b for b in ALL if b.not_run]
    assert len(marked) <= 4, f"not-run markers are for exceptions: {[b.name for b in marked]}"


def test_file_blocks_are_used_by_another_block():
    for block in ALL:
        if not block.file:
            continue
        stem = pathlib.PurePath(block.file).stem
        others = [b.code for b in blocks(block.page) if b is not block]
        assert any(stem in code for code in others), f"{block.name}: {block.file} is never used"


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_tables_are_the_generated_ones():
    """A `<!-- table: name -->` marker in the README is followed by a copy of the table that
    docs/hooks.py generates from the committed files (GitHub does not run the hook)."""
    hooks, text = _hooks(), README.read_text()
    names = hooks.MARKER.findall(text)
    assert names, "the README's headline table comes from a committed result file"
    for name in names:
        marker = f"<!-- table: {name} -->"
        copy = text[text.index(marker) + len(marker) :].lstrip("\n").split("\n\n", 1)[0]
        assert copy.strip() == hooks.TABLES[name]().strip(), f"README table {name} is stale"


def test_docs_tables_render():
    hooks = _hooks()
    for page in PAGES[1:]:
        text = page.read_text()
        for name in hooks.MARKER.findall(text):
            assert name in hooks.TABLES, f"{page}: unknown table {name}"
            assert hooks.TABLES[name]().count("\n") >= 2


# ------------------------------------------------------------------------- python blocks


def _file_blocks(page: pathlib.Path, folder: pathlib.Path) -> None:
    for block in blocks(page):
        if block.file:
            target = folder / block.file
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(block.code.split("\n", 1)[1])


def _env(tmp_path: pathlib.Path, work: pathlib.Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": f"{work}{os.pathsep}{ROOT}", "MPLBACKEND": "Agg"}
    env.update(ESPER_KERNEL_DIR=str(tmp_path / "kernels"), HYDRA_FULL_ERROR="1")
    env.update(WANDB_MODE="disabled", WANDB_SILENT="true")
    return env


@pytest.mark.parametrize("block", PYTHON, ids=ids(PYTHON))
def test_python_block(block, tmp_path):
    if block.not_run:
        pytest.skip(block.not_run)
    work = tmp_path / "work"
    work.mkdir()
    _file_blocks(block.page, work)
    script = tmp_path / "block.py"
    script.write_text(block.code)
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=ROOT,
        env=_env(tmp_path, work),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"{block.name}\n{block.code}\n{proc.stderr[-4000:]}"


# ------------------------------------------------------------------------- bash blocks


def _hydra(value) -> str:
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_hydra(v)}" for k, v in value.items()) + "}"
    return str(value)


@functools.cache
def small_overrides() -> dict[str, list[str]]:
    """Per registered task, the Task fields that make it tiny (tests/conftest.py)."""
    from tests.conftest import small_kwargs

    out = {}
    for task, env_id in (("spirals", "Spirals"), ("fashion_mnist", "FashionMNIST")):
        kwargs = small_kwargs(env_id, ROOT)
        out[task] = [f"{k}={_hydra(v)}" for k, v in kwargs.items()]
    return out


def _value(args: list[str], key: str, default: str | None = None) -> str | None:
    for arg in reversed(args):
        if arg.startswith(key + "="):
            return arg.split("=", 1)[1]
    return default


def _listed(value: str) -> list[str]:
    return [v for v in value.strip("[]").split(",") if v]


def _compose(args: list[str]) -> list[str]:
    """`--cfg job` of the command: composed and checked against the schemas, nothing run. A
    sweep (-m) is composed at each swept key's first value."""
    rest = [a for a in args[2:] if a != "-m"]
    for i, arg in enumerate(rest):
        key, _, value = arg.partition("=")
        if value and "," in value and not value.startswith(("[", "{")):
            rest[i] = f"{key}={value.split(',')[0]}"
    return [*args[:2], "--cfg", "job", *rest]


def _composed_once(args: list[str], seen: set) -> tuple[str, list[str]]:
    """A command composed already in this block but for its seed and run dir (a `for` loop)
    is not composed again."""
    key = tuple(a for a in args if not a.startswith(("seed=", "hydra.run.dir=")))
    if key in seen:
        return "skip", ["composed above, but for its seed and run dir"]
    seen.add(key)
    return "compose", args


def plan(args: list[str], small: dict[str, list[str]], seen: set) -> tuple[str, list[str]]:
    """What the default suite does with `python <args>`: ("run", args + small overrides),
    ("compose", `--cfg job`) or ("skip", reason). Runs are the cheap commands: training a
    baseline, evaluating baselines without lookahead; within a block, the first of each
    (entry point, agent) runs and the next ones are composed."""
    module, rest = args[1], args[2:]
    if module == "esper_gym.validate":
        return "skip", ["replays whole committed files: slow test only"]
    if module == "esper_gym.train":
        agent = _value(rest, "agent", "tamiyo")
        experiment = _value(rest, "+experiment")
        task = _value(rest, "task", experiment or "spirals")
        if agent == "tamiyo" or _value(rest, "resume") or (module, agent) in seen:
            return _composed_once(_compose(args), seen)
        seen.add((module, agent))
        extra = [f"task.{o}" for o in small.get(task, [])]
        extra += ["eval.episodes=1", "eval.compare=[noop]", "logger=none", "logger.progress=false"]
        if "-m" in rest:  # a sweep: every swept key at its first value, so one job runs
            for arg in rest:
                key, _, value = arg.partition("=")
                if value and "," in value and not value.startswith(("[", "{")):
                    extra.append(f"{key}={value.split(',')[0]}")
        return "run", [*args, *extra]
    if module == "esper_gym.evaluate":
        agents = _value(rest, "agents", "")
        checkpoints = any(a.startswith(("checkpoints.", "+checkpoints.")) for a in rest)
        if checkpoints or "lookahead" in agents or (module, "") in seen:
            return _composed_once(_compose(args), seen)
        seen.add((module, ""))
        tasks = _listed(_value(rest, "tasks", "[spirals,fashion_mnist]"))
        extra = ["seeds=1", "n_jobs=1", "plots.enabled=false", "oracle.enabled=false"]
        extra += [f"task_overrides.{t}.{o}" for t in tasks for o in small.get(t, [])]
        return "run", [*args, *extra]
    return "skip", [f"{module}: not an entry point this test knows"]


def shim(argv: list[str]) -> int:
    """`python ...` inside a bash block (see the module docstring)."""
    mode, log = os.environ["DOCS_MODE"], os.environ["DOCS_LOG"]
    if argv[:1] == ["--entry"]:  # esper-train / esper-evaluate
        argv = ["-m", f"esper_gym.{argv[1]}", *argv[2:]]
    record = {"argv": argv}
    if len(argv) < 2 or argv[0] != "-m" or not argv[1].startswith("esper_gym."):
        record["action"] = "skip"
        action, args = "skip", ["not a python -m esper_gym.* command"]
    elif mode == "as_written":
        action, args = "run", argv
    else:
        seen_file = pathlib.Path(log).with_suffix(".seen")
        seen = (
            {tuple(s) for s in json.loads(seen_file.read_text())} if seen_file.exists() else set()
        )
        action, args = plan(argv, json.loads(os.environ["DOCS_SMALL"]), seen)
        seen_file.write_text(json.dumps(sorted(seen)))
    record.update(action=action, args=args)
    rc = 0
    if action != "skip":
        env = {**os.environ, "PATH": os.environ["DOCS_REAL_PATH"]}
        proc = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True)
        rc = proc.returncode
        record.update(rc=rc, tail=(proc.stdout[-2000:] + proc.stderr[-4000:]) if rc else "")
    with open(log, "a") as f:
        f.write(json.dumps(record) + "\n")
    return rc


def run_bash(block: Block, mode: str, tmp_path: pathlib.Path, timeout: float) -> list[dict]:
    if block.not_run:
        pytest.skip(block.not_run)
    work, shims = tmp_path / "work", tmp_path / "shims"
    shims.mkdir()
    shutil.copytree(ROOT / "results", work / "results")
    _file_blocks(block.page, work)
    me = pathlib.Path(__file__).resolve()
    for name, extra in (("python", ""), ("python3", ""), ("esper-train", "--entry train "),
                        ("esper-evaluate", "--entry evaluate ")):  # fmt: skip
        path = shims / name
        path.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{me}" {extra}"$@"\n')
        path.chmod(0o755)
    log = tmp_path / "commands.jsonl"
    log.touch()
    env = _env(tmp_path, work)
    env.update(PATH=str(shims), DOCS_REAL_PATH=os.environ.get("PATH", ""), DOCS_MODE=mode)
    env.update(DOCS_LOG=str(log), DOCS_SMALL=json.dumps(small_overrides()))
    subprocess.run(
        ["/bin/bash", "-c", block.code], cwd=work, env=env, capture_output=True, timeout=timeout
    )
    records = [json.loads(line) for line in log.read_text().splitlines()]
    ran = [r for r in records if r["argv"][:1] == ["-m"] and r["argv"][1].startswith("esper_gym.")]
    code = "\n".join(re.sub(r"(^|\s)#.*", "", line) for line in block.code.split("\n"))
    written = len(COMMAND.findall(code))
    assert len(ran) >= written, f"{block.name}: {written} commands written, {len(ran)} reached"
    failed = [r for r in ran if r.get("rc")]
    assert not failed, "\n".join(f"{shlex.join(r['args'])}\n{r['tail']}" for r in failed)
    return records


@pytest.mark.parametrize("block", BASH, ids=ids(BASH))
def test_bash_block(block, tmp_path):
    run_bash(block, "small", tmp_path, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("block", BASH, ids=ids(BASH))
def test_bash_block_as_written(block, tmp_path):
    run_bash(block, "as_written", tmp_path, timeout=6 * 3600)


if __name__ == "__main__":
    sys.exit(shim(sys.argv[1:]))


def test_the_plan_gate_results_table_is_the_generated_one():
    """results/tamiyo_pace/plans/README.md carries a copy of `pace_plans` (no marker: the page
    is also in the site, where a marker would render the table twice)."""
    text = (ROOT / "results/tamiyo_pace/plans/README.md").read_text()
    assert _hooks().pace_plans().strip() in text
    text = (ROOT / "results/tamiyo_pace/counts/README.md").read_text()
    assert _hooks().pace_counts().strip() in text
