"""Which CPU settings the numbers of an episode depend on, and what pinning them costs.

Host training on CPU runs through ATen kernels (chosen by CPU capability: default, AVX2,
AVX-512), MKL (BLAS, its own dispatch) and oneDNN (its own JIT per ISA); each reduces in a
different order on a different code path, so a recorded return may not replay bit for bit on
another CPU. Each setting below plays recorded episodes in a fresh subprocess (the variables
must be set before torch loads MKL) and prints the bits of their return and test accuracy.

    python experiments/bench_numerics.py                      # equality table (~10 minutes)
    python experiments/bench_numerics.py --speed --repeats 3 --episodes 0 47   # env steps/s

"=rec": the replay gives the committed number; "=native": the same bits as the native run of
this machine; otherwise the numbers. The machine knobs (`avx2`, `avx512`: ATen's capability,
MKL's instruction cap, oneDNN's ISA cap) stand in for another CPU; under the portable mode
(`esper_gym.numerics.PORTABLE_ENV`, knobs it sets itself left out) they must change nothing.

AMD EPYC (AVX-512), torch 2.13.0, 2 cores shared with other jobs, on the format 1 file recorded
natively on another machine (`git show d2107f4:results/baselines_test/replays.json > v1.json`,
then `--file v1.json`; return / test_acc):

| setting | ep 30 noop spirals | ep 0 schedule spirals | ep 47 fragrow fashion_mnist |
|---|---|---|---|
| recorded (another machine) | 3.837890625 / 0.6181640625 | 3.5198418836075214 / 0.5947265625 | 7.708878805741068 / 0.892 |
| native | 3.76953125 / 0.603515625 | 3.2854668836075214 / 0.5859375 | 7.708878805741068 / 0.8922 |
| ATEN_CPU_CAPABILITY=avx2 | =native | =native | =native |
| ATEN_CPU_CAPABILITY=default | 3.525390625 / 0.5791015625 | 3.2464043836075214 / 0.5751953125 | =rec |
| MKL_CBWR=AVX2 | =native | =native | =native |
| MKL_CBWR=COMPATIBLE | 3.525390625 / 0.5791015625 | =rec | =native |
| MKL_CBWR=COMPATIBLE,STRICT | 3.525390625 / 0.5791015625 | =rec | =native |
| MKL_ENABLE_INSTRUCTIONS=AVX2 | =native | =native | =native |
| ONEDNN_MAX_CPU_ISA=AVX2 | =native | =native | =native |
| ONEDNN_MAX_CPU_ISA=SSE41 | =native | =native | =native |
| mkldnn off | =native | =native | =native |
| deterministic algorithms | =native | =native | =native |
| threads 2 (records: 1) | 3.75 / 0.6162109375 | =native | =rec |
| avx2 knobs (all three) | =native | =native | =native |
| avx2 knobs + MKL_CBWR=AVX2 | =native | =native | =native |
| avx512 knobs | =native | =native | =native |
| ATen default + MKL_CBWR=COMPATIBLE | 3.818359375 / 0.6025390625 | 3.2464043836075214 / 0.587890625 | =rec |
| portable | 3.818359375 / 0.6025390625 | 3.2464043836075214 / 0.587890625 | =native |
| portable + avx2 knobs | same as portable | same as portable | =native |
| portable + avx512 knobs | same as portable | same as portable | =native |
| portable + threads 2 | same as portable | same as portable | =native |

No setting gives all three recorded numbers here: the recording machine's MKL path is not one
this AMD CPU can take (MKL_CBWR=AVX2 is ignored on non-Intel CPUs, as MKL's docs say), so it was
most likely an Intel CPU. Natively on this CPU ATen's AVX2 and AVX-512 kernels agreed, ATen's
default kernels, MKL's compatible branch and the thread count did not; with ATen at default, a
fashion_mnist episode also went through oneDNN (portable, which turns it off, differs from "ATen
default + MKL_CBWR=COMPATIBLE" there). Under the portable mode no knob changed a bit.

Speed (`--speed --repeats 3 --episodes 0 47`, native and portable alternated, env steps/s):
spirals schedule 97.8/64.1, 80.6/62.8, 97.6/65.0 (portable / native 0.67 median);
fashion_mnist fragrow 15.6/7.9, 11.8/6.6, 9.4/5.5 (0.56). One run of each setting alone: MKL's
compatible branch is most of it (fashion_mnist 18 -> 11 steps/s), ATen's default kernels
little (18 -> 15.5 or 10).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

from report import report  # experiments/report.py: --report writes the output

ROOT = pathlib.Path(__file__).resolve().parent.parent
REPLAYS = ROOT / "results/baselines_test/replays.json"
# Episodes of REPLAYS that this machine (AMD EPYC, AVX-512) does not reproduce natively:
# spirals NoOp (no kernels), spirals schedule (kernels), fashion_mnist fragrow (kernels).
EPISODES = (30, 0, 47)

AVX2 = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
}
AVX512 = {
    "ATEN_CPU_CAPABILITY": "avx512",
    "MKL_ENABLE_INSTRUCTIONS": "AVX512",
    "ONEDNN_MAX_CPU_ISA": "AVX512_CORE",
}


def settings() -> list[tuple[str, dict[str, str], list[str]]]:
    """(name, environment variables, child flags) of every setting compared."""
    from esper_gym.numerics import PORTABLE_ENV

    portable = dict(PORTABLE_ENV)
    # The machine knobs that the portable mode does not itself pin: what another CPU changes.
    knobs = {
        n: {k: v for k, v in d.items() if k not in portable}
        for n, d in (("avx2", AVX2), ("avx512", AVX512))
    }
    return [
        ("native", {}, []),
        ("ATEN_CPU_CAPABILITY=avx2", {"ATEN_CPU_CAPABILITY": "avx2"}, []),
        ("ATEN_CPU_CAPABILITY=default", {"ATEN_CPU_CAPABILITY": "default"}, []),
        ("MKL_CBWR=AVX2", {"MKL_CBWR": "AVX2"}, []),
        ("MKL_CBWR=COMPATIBLE", {"MKL_CBWR": "COMPATIBLE"}, []),
        ("MKL_CBWR=COMPATIBLE,STRICT", {"MKL_CBWR": "COMPATIBLE,STRICT"}, []),
        ("MKL_ENABLE_INSTRUCTIONS=AVX2", {"MKL_ENABLE_INSTRUCTIONS": "AVX2"}, []),
        ("ONEDNN_MAX_CPU_ISA=AVX2", {"ONEDNN_MAX_CPU_ISA": "AVX2"}, []),
        ("ONEDNN_MAX_CPU_ISA=SSE41", {"ONEDNN_MAX_CPU_ISA": "SSE41"}, []),
        ("mkldnn off", {}, ["--mkldnn-off"]),
        ("deterministic algorithms", {}, ["--deterministic"]),
        ("threads 2 (records: 1)", {}, ["--threads", "2"]),
        ("avx2 knobs (all three)", AVX2, []),
        ("avx2 knobs + MKL_CBWR=AVX2", {**AVX2, "MKL_CBWR": "AVX2"}, []),
        ("avx512 knobs", AVX512, []),
        (
            "ATen default + MKL_CBWR=COMPATIBLE",
            {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE"},
            [],
        ),
        ("portable", portable, []),
        ("portable + avx2 knobs", {**knobs["avx2"], **portable}, []),
        ("portable + avx512 knobs", {**knobs["avx512"], **portable}, []),
        ("portable + threads 2", portable, ["--threads", "2"]),
    ]


def child(args) -> None:
    """Play recorded episodes' actions; print their numbers and step rates, a JSON line each."""
    import gymnasium as gym
    import torch

    import esper_gym  # noqa: F401  (registers the env ids)
    from esper_gym import numerics

    numerics.apply()  # the in-process half of the portable mode, if its variables are set
    if args.mkldnn_off:
        torch.backends.mkldnn.enabled = False
    if args.deterministic:
        torch.use_deterministic_algorithms(True)
    torch.set_num_threads(args.threads)
    episodes = json.loads(pathlib.Path(args.file).read_text())["episodes"]
    for i in args.indices:
        ep = episodes[i]
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in ep["env_kwargs"].items()}
        env = gym.make(ep["env_id"], disable_env_checker=True, kernel_dir=args.kernel_dir, **kwargs)
        env.reset(seed=ep["seed"])
        total, info, t0 = 0.0, {}, time.perf_counter()
        for action in ep["actions"]:
            _, reward, _, _, info = env.step(action)
            total += reward
        seconds = time.perf_counter() - t0
        env.close()
        out = {"return": total, "test_acc": info.get("test_acc"), "steps": len(ep["actions"])}
        out |= {"seconds": seconds, "numerics": numerics.current()}
        print(json.dumps(out))


def run_child(file, indices, env_vars, flags, kernel_dir) -> list[dict]:
    # Start from this environment without any knob, so that only `env_vars` set them.
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {*AVX2, *AVX512, "MKL_CBWR", "ESPER_NUMERICS"}
    }
    env.update(env_vars)
    cmd = [
        sys.executable,
        __file__,
        "--child",
        str(file),
        *map(str, indices),
        "--kernel-dir",
        kernel_dir,
        *flags,
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(f"{cmd}: {out.stderr[-2000:]}")
    return [json.loads(line) for line in out.stdout.strip().splitlines()[-len(indices) :]]


def table(file, episodes) -> None:
    recorded = json.loads(pathlib.Path(file).read_text())["episodes"]
    with tempfile.TemporaryDirectory() as kernels:
        rows = {}
        for name, env_vars, flags in settings():
            rows[name] = run_child(file, episodes, env_vars, flags, kernels)
            print(f"  ran {name}", file=sys.stderr, flush=True)
    heads = [f"ep {i} {recorded[i]['agent']} {recorded[i]['task']}" for i in episodes]
    print(f"| setting | {' | '.join(heads)} |\n|---|{'---|' * len(episodes)}")
    for name, results in rows.items():
        cells = []
        for j, (i, r) in enumerate(zip(episodes, results)):
            native = rows["native"][j]
            same = (r["return"], r["test_acc"])
            if same == (recorded[i]["return"], recorded[i]["test_acc"]):
                cells.append("=rec")
            elif name != "native" and same == (native["return"], native["test_acc"]):
                cells.append("=native")
            else:
                cells.append(f"{r['return']!r} / {r['test_acc']!r}")
        print(f"| {name} | {' | '.join(cells)} |")
    print("capability seen by torch:", {n: r[0]["numerics"]["capability"] for n, r in rows.items()})


def speed(file, episodes, repeats) -> None:
    """Native vs portable, alternated in each repeat so that load from other processes hits
    both alike; the ratio is portable steps/s / native steps/s."""
    from esper_gym.numerics import PORTABLE_ENV

    recorded = json.loads(pathlib.Path(file).read_text())["episodes"]
    with tempfile.TemporaryDirectory() as kernels:
        run_child(
            file, episodes, {}, [], kernels
        )  # warm the kernel store: compiling is not stepping
        print("| episode | repeat | native steps/s | portable steps/s | portable / native |")
        print("|---|---|---|---|---|")
        for i in episodes:
            ratios = []
            for r in range(repeats):
                pair = {}
                for mode in ("native", "portable") if r % 2 == 0 else ("portable", "native"):
                    env_vars = PORTABLE_ENV if mode == "portable" else {}
                    (out,) = run_child(file, [i], env_vars, [], kernels)
                    pair[mode] = out["steps"] / out["seconds"]
                ratios.append(pair["portable"] / pair["native"])
                name = f"{i} {recorded[i]['agent']} {recorded[i]['task']}"
                print(
                    f"| {name} | {r} | {pair['native']:.1f} | {pair['portable']:.1f} | {ratios[-1]:.3f} |",
                    flush=True,
                )
            print(f"| {i} | median | | | {sorted(ratios)[len(ratios) // 2]:.3f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", nargs="+", metavar="FILE INDEX")
    parser.add_argument("--kernel-dir")
    parser.add_argument("--mkldnn-off", action="store_true")
    parser.add_argument("--deterministic", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--file", default=str(REPLAYS))
    parser.add_argument("--episodes", type=int, nargs="+", default=list(EPISODES))
    parser.add_argument("--speed", action="store_true", help="native vs portable env steps/s")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--report", default=None, help="also write the output here")
    args = parser.parse_args()
    if args.child:
        args.file, args.indices = args.child[0], [int(i) for i in args.child[1:]]
        child(args)
        return
    with report(args.report):
        if args.speed:
            speed(args.file, args.episodes, args.repeats)
        else:
            table(args.file, args.episodes)


if __name__ == "__main__":
    main()
