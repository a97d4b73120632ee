#!/usr/bin/env bash
# The package as a user gets it: a wheel built from a clean checkout (the files git knows, none
# built or cached), installed outside the checkout without -e, runs the main job from an empty
# folder and writes its results. Dependencies are those of the dev venv (argument 1, default
# .venv/bin/python); the wheel goes --no-deps into a target of its own that PYTHONPATH puts
# ahead of the venv's editable install, and the run checks that it imported that copy.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=$(cd "$root" && realpath -s "${1:-.venv/bin/python}")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

mkdir "$tmp/src"
if git -C "$root" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  # tracked files plus new ones not ignored: what the next commit's checkout holds
  (cd "$root" && git ls-files -z --cached --others --exclude-standard |
    tar --null -T - --ignore-failed-read -cf - 2>/dev/null) | tar -xf - -C "$tmp/src"
else
  (cd "$root" && tar --exclude=./.venv --exclude=./build --exclude=./dist --exclude='*.egg-info' \
    --exclude=./outputs --exclude=./multirun --exclude=./wandb -cf - .) | tar -xf - -C "$tmp/src"
fi
"$py" -m pip wheel -q --no-deps -w "$tmp/dist" "$tmp/src"
wheel=$(ls "$tmp"/dist/esper_gym-*.whl)

# Every config of conf/ ships as esper_gym/conf/...; no top-level `agents` package.
"$py" - "$wheel" "$root/conf" <<'PY'
import pathlib, sys, zipfile

names = set(zipfile.ZipFile(sys.argv[1]).namelist())
conf = pathlib.Path(sys.argv[2])
want = {f"esper_gym/conf/{p.relative_to(conf).as_posix()}" for p in conf.rglob("*.yaml")}
missing = sorted(want - names)
assert not missing, f"not in the wheel (list their folder in pyproject's packages): {missing}"
tops = sorted({n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")})
assert tops == ["esper_gym"], f"the wheel installs top-level names {tops}, not only esper_gym"
PY

"$py" -m pip install -q --no-deps --target "$tmp/site" "$wheel"
mkdir "$tmp/run"
cd "$tmp/run"
export PYTHONPATH="$tmp/site" ESPER_KERNEL_DIR="$tmp/kernels"
"$py" -c 'import esper_gym, sys; assert esper_gym.__file__.startswith(sys.argv[1]), esper_gym.__file__' "$tmp/site"
"$py" -m esper_gym.train agent=heuristic logger=none eval.episodes=1
"$py" - <<'PY'
import glob, json

(path,) = glob.glob("outputs/*/*/results.json")
results = json.load(open(path))
(episode,) = results["eval"]["heuristic"]["episodes"]
assert results["task"] == "spirals" and 0 < episode["test_acc"] <= 1, results
print(f"wheel OK: {path} test_acc={episode['test_acc']:.4f}")
PY
"$tmp/site/bin/esper-train" --help >/dev/null  # the console script runs too
