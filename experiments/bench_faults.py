"""Reliability benchmark: faulty kernels and corrupted artifacts must never cost a training run.

Each episode runs `Esper/SpiralsFaulty-v0` (its library adds fault_raise, fault_nan,
fault_shape and fault_slow to the real blueprints) under a scripted policy, with a fresh kernel
store (`kernel_dir`) per episode:

1. before the episode, put a genuine low_rank kernel for fc1 in the store, then damage it, one
   variant per episode: on disk (bytes flipped, truncated, or replaced by a pickle: a checksum
   mismatch), or as a poisoned shared store would, with an index that agrees with the hostile
   bytes (`tests/hostile.py`): a kernel that zeroes its input in place, a graph that
   writes a file through aten.from_file, an archive with a second, case-colliding sample-input
   member holding a pickle payload;
2. germinate and advance a real kernel (residual_mlp on fc0);
3. germinate the damaged recipe on fc1: it must be refused (a "load" fault), the slot must stay
   DORMANT, and nothing in it may run (the victim file stays intact, the marker absent);
4. germinate and advance each fault kernel, on slots and in an order drawn from the seed:
   each must fault exactly `max_faults` times (exception / nonfinite / shape / slow) and be
   culled by its circuit breaker;
5. inject each kernel of INJECTED straight into a freed slot (`KasminaLayer.germinate`: a
   kernel that passed artifact validation and still misbehaves) and advance it to the stage
   where it faults: `inject_float64` returns a float64 delta in TRAINING (a "dtype" fault per
   call, `max_faults` of them, then its breaker); `inject_nan_backward` has an exact zero
   forward and a NaN backward, harmless in TRAINING (its input is detached), and in BLENDING
   sends NaN into the host's gradients (one "host_grad" fault: the host step is skipped and
   the seed culled at once);
6. germinate a fault kernel and cull it before it runs (a control: no fault may appear);
7. take the real seed on to FOSSILIZED, try the damaged recipe once more (refused again),
   and wait for the end of the training budget.

The script counts what it injects itself (expected faults by kind, breaker culls, refused
loads) and compares with what the env recorded (`info["fault_kinds"]`, `info["events"]`), then
ASSERTS that nothing was lost: every episode finished its budget with finite host weights,
every injected fault was recorded with its kind, every fault kernel was culled (by its circuit
breaker; a host-gradient fault at once), every corrupted load was refused, and the real seed
survived. A real kernel that is itself slow (a loaded machine) is
counted separately from its own circuit breaker, not hidden.

The latency budget is the task's 20 ms unless fault_slow runs faster than twice that here, in
which case it is set to half of fault_slow's fastest measured call (so slow is a fault).

    nice python experiments/bench_faults.py [--episodes 6] [--seed 0]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import json
import pathlib
import pickle
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch

import esper_gym  # noqa: F401  (registers the Esper/* ids)
from esper_gym.actions import ADVANCE, CULL, GERMINATE, Action
from esper_gym.kasmina import SeedState
from esper_gym.kernels import compile_blueprint
from esper_gym.kernels.blueprints import BLUEPRINTS, FAULT_LIBRARY
from esper_gym.tasks import TASKS

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the attack builders are test code, not in the wheel
from tests.hostile import (  # noqa: E402
    Float64Delta,
    NanBackward,
    case_collision,
    file_writer,
    input_mutator,
)

ENV_ID = "Esper/SpiralsFaulty-v0"
# Fault blueprints of the task's library: the kind each call records from TRAINING on.
FAULT_KIND = {
    "fault_raise": "exception",
    "fault_nan": "nonfinite",
    "fault_shape": "shape",
    "fault_slow": "slow",
}
REAL = "residual_mlp"
DAMAGED = "low_rank"  # the recipe damaged in the store, germinated on fc1
CORRUPTIONS = ("flip", "truncate", "pickle", "mutating_op", "from_file", "case_collision")


@dataclass(frozen=True)
class Injected:
    """A misbehaving kernel put straight into a slot (past artifact validation)."""

    build: Callable[[], torch.nn.Module]
    kind: str  # the fault kind the env must record
    stage: str  # "training" or "blending": the ADVANCE from which every call faults
    faults: Callable[[int], int]  # faults expected, given max_faults
    culled_by: str  # prefix of the cull event's reason


# Add a kind here: the plan, the book-keeping and the checks pick it up.
INJECTED = {
    "inject_float64": Injected(Float64Delta, "dtype", "training", lambda m: m, "circuit breaker"),
    "inject_nan_backward": Injected(NanBackward, "host_grad", "blending", lambda m: 1, "host_grad"),
}
FAULT_NAMES = frozenset({*FAULT_KIND, *INJECTED})


def damage_store(env, how: str, victim: pathlib.Path, marker: pathlib.Path) -> pathlib.Path:
    """Put the DAMAGED recipe for fc1's shape in the env's store, damaged `how`; its file."""
    u = env.unwrapped
    shape = u.layers[1].out_shape
    blueprint = u.generator.propose(shape, DAMAGED, u.task.param_budget)
    artifact, meta = compile_blueprint(blueprint, shape)
    hostile = {
        "mutating_op": lambda: input_mutator(shape),
        "from_file": lambda: file_writer(artifact, victim),
        "case_collision": lambda: case_collision(artifact, marker),
    }
    if how in hostile:  # poisoned: the index agrees with the hostile bytes
        bad = hostile[how]()
        sha = hashlib.sha256(bad).hexdigest()
        u.store.put(bad, dataclasses.replace(meta, sha256=sha, size_bytes=len(bad)))
        return u.store.path(sha)
    u.store.put(artifact, meta)
    corrupt(u.store.path(meta.sha256), how)
    return u.store.path(meta.sha256)


def corrupt(path: pathlib.Path, how: str) -> None:
    """Damage an artifact file in place, the way a disk, a copy or an attacker might."""
    data = path.read_bytes()
    if how == "flip":  # same length, 16 bytes in the middle inverted
        mid = len(data) // 2
        data = data[:mid] + bytes(b ^ 0xFF for b in data[mid : mid + 16]) + data[mid + 16 :]
    elif how == "truncate":
        data = data[: len(data) // 2]
    elif how == "pickle":  # a payload that would run code if anything unpickled it
        data = pickle.dumps(("os", "system", "echo pwned"))
    else:
        raise ValueError(how)
    path.write_bytes(data)


def calibrate_latency_budget(default_ms: float, batch: int = 128) -> tuple[float, float]:
    """(budget ms, fault_slow's fastest call ms): the default unless fault_slow is too fast."""
    kernel = BLUEPRINTS["fault_slow"]().build((16,))
    x = torch.randn(batch, 16)
    times = []
    with torch.no_grad():
        for _ in range(5):
            start = time.perf_counter()
            kernel(x)
            times.append((time.perf_counter() - start) * 1e3)
    fastest = min(times)
    return (default_ms if fastest > 2 * default_ms else fastest / 2), fastest


class ScriptedPolicy:
    """Works through a plan of intents, one env step each, waiting while an intent is not
    valid yet (e.g. a slot still embargoed, a seed still blending). Counts what it injects."""

    def __init__(self, plan: list[tuple], max_faults: int) -> None:
        self.plan = list(plan)
        self.max_faults = max_faults
        self.expected: collections.Counter = collections.Counter()
        self.fault_culls_expected = 0
        self.refusals_expected = 0
        self.refused_and_dormant = 0
        self.control_germinated = 0

    def act(self, env, mask: np.ndarray) -> tuple[int, tuple | None]:
        if not self.plan:
            return 0, None
        intent = self.plan[0]
        kind, layer, slot = intent[0], intent[1], intent[2]
        u = env.unwrapped
        if kind == "inject":  # straight into the slot, then a WAIT step runs it
            if u.layers[layer].slots[slot].state != SeedState.DORMANT:
                return 0, None  # still embargoed: try again next step
            u.layers[layer].germinate(slot, INJECTED[intent[3]].build(), intent[3])
            u._update_mask()  # the env did not see this germination
            self.plan.pop(0)
            return 0, intent
        if kind == "germinate":
            b = u.task.blueprints.index(intent[3])
            action = u.layout.encode(Action(GERMINATE, layer, slot, b))
        elif kind == "advance":
            state = u.layers[layer].slots[slot].state
            lost = state in (SeedState.CULLED, SeedState.EMBARGOED, SeedState.DORMANT)
            if intent[3] == "fossil" and (state == SeedState.FOSSILIZED or lost):
                # Done, or the real seed's own breaker culled it (slow calls on a loaded
                # machine: counted as real faults, not hidden): next intent on the next step.
                self.plan.pop(0)
                return self.act(env, mask)
            action = u.layout.encode(Action(ADVANCE, layer, slot))
        elif kind == "cull":
            action = u.layout.encode(Action(CULL, layer, slot))
        else:
            raise ValueError(kind)
        if not mask[action]:
            return 0, None  # not valid yet: WAIT and try again next step
        if not (kind == "advance" and intent[3] == "fossil"):
            self.plan.pop(0)
        return action, intent

    def executed(self, env, intent: tuple | None, info: dict) -> None:
        """Book-keeping after the step that executed `intent`."""
        if intent is None:
            return
        kind, layer, slot, arg = intent[0], intent[1], intent[2], intent[3]
        u = env.unwrapped
        if kind == "germinate" and intent[4] == "corrupted":
            self.refusals_expected += 1
            self.expected["load"] += 1
            self.refused_and_dormant += u.layers[layer].slots[slot].state == SeedState.DORMANT
        elif kind == "germinate" and intent[4] == "control":
            self.control_germinated += 1
        elif kind == "advance" and arg in FAULT_KIND:
            # GERMINATED -> TRAINING: from now on every call of the kernel faults (slow ones
            # when over budget) until the breaker culls it after max_faults.
            self.expected[FAULT_KIND[arg]] += self.max_faults
            self.fault_culls_expected += 1
        elif kind == "advance" and arg in INJECTED and intent[4] == "fault":
            # The ADVANCE into the stage where it faults (see INJECTED).
            self.expected[INJECTED[arg].kind] += INJECTED[arg].faults(self.max_faults)
            self.fault_culls_expected += 1


def episode_plan(rng: np.random.Generator) -> list[tuple]:
    """The intents of one episode: (kind, layer, slot, blueprint or note, role)."""
    faults = list(rng.permutation(FAULT_LIBRARY))
    slots = [(1, 0), (1, 1), (2, 0), (2, 1)]
    order = rng.permutation(len(slots))
    slots = [slots[i] for i in order]
    plan = [
        ("germinate", 0, 0, REAL, "real"),
        ("advance", 0, 0, REAL, "real"),
        ("germinate", 1, 0, DAMAGED, "corrupted"),  # damaged in the store (see damage_store)
    ]
    for bp, (layer, slot) in zip(faults, slots):
        plan += [("germinate", layer, slot, bp, "fault"), ("advance", layer, slot, bp, "fault")]
    for i, name in enumerate(INJECTED):  # on the same slots, once their embargo is over
        layer, slot = slots[i % len(slots)]
        plan += [("inject", layer, slot, name, "fault")]
        if INJECTED[name].stage == "blending":
            plan += [("advance", layer, slot, name, "setup")]  # TRAINING: no fault yet
        plan += [("advance", layer, slot, name, "fault")]
    control = str(rng.choice(FAULT_LIBRARY))
    plan += [("germinate", 0, 1, control, "control"), ("cull", 0, 1, control, "control")]
    plan += [("advance", 0, 0, "fossil", "real")]  # TRAINING -> BLENDING ... -> FOSSILIZED
    plan += [("germinate", 1, 1, DAMAGED, "corrupted")]  # fc1 again, once its slot is free
    return plan


def run_episode(seed: int, corruption: str, budget_ms: float, root: pathlib.Path) -> dict:
    kernel_dir = root / f"store-{seed}"
    env = gym.make(ENV_ID, kernel_dir=str(kernel_dir), latency_budget_ms=budget_ms)
    u = env.unwrapped
    policy = ScriptedPolicy(episode_plan(np.random.default_rng(seed)), u.task.max_faults)
    obs, info = env.reset(seed=seed)
    victim, marker = root / f"victim-{seed}.txt", root / f"marker-{seed}"
    victim.write_bytes(b"intact")
    corrupted = damage_store(env, corruption, victim, marker)
    recorded: collections.Counter = collections.Counter()
    events: list[dict] = []
    terminated = truncated = False
    steps = 0
    while not (terminated or truncated):
        action, intent = policy.act(env, obs["action_mask"])
        obs, _, terminated, truncated, info = env.step(action)
        steps += 1
        recorded.update(info["fault_kinds"])
        events += info["events"]
        policy.executed(env, intent, info)
    breaker_culls = [e for e in events if e["reason"].startswith("circuit breaker")]
    fault_culls = [e for e in events if e["to"] == "CULLED" and e["reason"] != "agent"]
    # Each fault kernel culled for its own reason (its breaker, or a host-gradient fault).
    culled_as_expected = sum(
        e["reason"].startswith(INJECTED[e["blueprint"]].culled_by)
        if e["blueprint"] in INJECTED
        else e["reason"].startswith("circuit breaker")
        for e in fault_culls
        if e["blueprint"] in FAULT_NAMES
    )
    # Faults of real kernels (slow calls on a loaded machine), from their own breakers: a live
    # real seed's breaker count, or max_faults for a real seed its breaker culled.
    real_faults = sum(
        s.breaker.faults
        for layer in u.layers
        for s in layer.slots
        if s.blueprint and s.blueprint not in FAULT_NAMES and s.state != SeedState.DORMANT
    ) + u.task.max_faults * sum(e["blueprint"] not in FAULT_NAMES for e in breaker_culls)
    real_state = u.layers[0].slots[0].state
    host_finite = all(bool(torch.isfinite(p).all()) for p in u.trainer.host_params)
    env.close()
    return {
        "seed": seed,
        "corruption": corruption,
        "steps": steps,
        "finished": bool(terminated and not info["diverged"]),
        "host_finite": host_finite,
        "test_acc": info.get("test_acc", float("nan")),
        "expected": dict(policy.expected),
        "recorded": dict(recorded),
        "real_faults": real_faults,
        "breaker_culls": len(breaker_culls),
        "fault_culls": len(fault_culls),
        "fault_kernels_culled": culled_as_expected,
        "fault_culls_expected": policy.fault_culls_expected,
        "refusals_expected": policy.refusals_expected,
        "refused_and_dormant": policy.refused_and_dormant,
        "control_germinated": policy.control_germinated,
        "plan_left": len(policy.plan),
        "real_seed_final_state": real_state.name,
        "damaged_file": corrupted.name,
        "nothing_ran": victim.read_bytes() == b"intact" and not marker.exists(),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--episodes", type=int, default=len(CORRUPTIONS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the per-episode records here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    budget_ms, slow_ms = calibrate_latency_budget(TASKS["spirals_faulty"].latency_budget_ms)
    print(
        f"{ENV_ID}: latency budget {budget_ms:.1f} ms "
        f"(fault_slow's fastest call here: {slow_ms:.1f} ms)"
    )
    start = time.perf_counter()
    records = []
    with tempfile.TemporaryDirectory(prefix="esper-bench-faults-") as root:
        for i in range(args.episodes):
            rec = run_episode(
                args.seed + i, CORRUPTIONS[i % len(CORRUPTIONS)], budget_ms, pathlib.Path(root)
            )
            records.append(rec)
            print(
                f"  episode seed {rec['seed']}: {rec['steps']} steps, finished={rec['finished']}, "
                f"corruption={rec['corruption']}, injected {sum(rec['expected'].values())}, "
                f"recorded {sum(rec['recorded'].values())}, breaker culls "
                f"{rec['breaker_culls']}, real seed {rec['real_seed_final_state']}, "
                f"test_acc {rec['test_acc']:.3f}",
                flush=True,
            )
    injected = sum((collections.Counter(r["expected"]) for r in records), collections.Counter())
    recorded = sum((collections.Counter(r["recorded"]) for r in records), collections.Counter())
    real_faults = sum(r["real_faults"] for r in records)
    finished = sum(r["finished"] for r in records)
    host_finite = sum(r["host_finite"] for r in records)
    culls = sum(r["breaker_culls"] for r in records)
    fault_culls = sum(r["fault_culls"] for r in records)
    culls_fault = sum(r["fault_kernels_culled"] for r in records)
    culls_expected = sum(r["fault_culls_expected"] for r in records)
    refusals_expected = sum(r["refusals_expected"] for r in records)
    refused = recorded["load"]
    fossils = sum(r["real_seed_final_state"] == "FOSSILIZED" for r in records)

    def kinds(c) -> str:
        return ", ".join(f"{k} {c[k]}" for k in sorted(c)) or "none"

    print(
        f"episodes: {len(records)} run, {finished} finished their training budget, "
        f"{host_finite} with finite host weights"
    )
    print(f"faults injected (counted by this script): {sum(injected.values())} ({kinds(injected)})")
    print(f"faults caught (recorded by the env):      {sum(recorded.values())} ({kinds(recorded)})")
    print(f"faults of real kernels (slow on this machine, from their breakers): {real_faults}")
    print(
        f"seeds culled for faults: {fault_culls} ({culls} by the circuit breaker); fault kernels "
        f"culled for their own fault: {culls_fault} of {culls_expected} advanced"
    )
    print(
        f"damaged or hostile store entries: {len(records)} "
        f"({kinds(collections.Counter(r['corruption'] for r in records))}); "
        f"germinations of them refused: {refused} of {refusals_expected}, "
        f"slot left DORMANT: {sum(r['refused_and_dormant'] for r in records)}, "
        f"nothing in them ran: {sum(r['nothing_ran'] for r in records)} of {len(records)}"
    )
    print(f"real seeds fossilized despite the faults: {fossils} of {len(records)}")
    print(f"wall time: {time.perf_counter() - start:.0f} s")

    # --- nothing was lost ------------------------------------------------------------------
    assert finished == len(records), "an episode did not finish its training budget"
    assert host_finite == len(records), "a NaN/Inf reached the host's weights"
    assert all(r["plan_left"] == 0 for r in records), "a scripted intent never became valid"
    for kind in {*injected, *recorded}:
        extra = real_faults if kind == "slow" else 0
        assert recorded[kind] == injected[kind] + extra, (
            f"{kind}: injected {injected[kind]} (+{extra} real slow), recorded {recorded[kind]}"
        )
    assert culls_fault == culls_expected, "a fault kernel escaped its cull"
    assert refused == refusals_expected, "a corrupted artifact was loaded, or a refusal lost"
    assert sum(r["refused_and_dormant"] for r in records) == refusals_expected
    assert all(r["nothing_ran"] for r in records), "a hostile artifact wrote a file"
    assert sum(r["control_germinated"] for r in records) == len(records)
    assert fossils == len(records) or real_faults > 0, "a real seed was lost"
    print("OK: every episode finished, every injected fault was recorded, nothing was lost")
    summary = {
        "latency_budget_ms": budget_ms,
        "episodes": len(records),
        "finished": finished,
        "injected": dict(injected),
        "recorded": dict(recorded),
        "real_faults": real_faults,
        "breaker_culls": culls,
        "fault_culls": fault_culls,
        "refused_loads": refused,
        "records": records,
    }
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
