"""What an agent's checkpoint records about the env it was trained on, and the check that a
checkpoint fits an env: shared by Tamiyo's checkpoints (esper_gym.agents.tamiyo.checkpoint), the
SB3 agents' (esper_gym.agents.sb3) and evaluation. Plain dicts, no torch.
"""

from __future__ import annotations

import hashlib

import gymnasium as gym


def env_record(env: gym.Env) -> dict:
    """What a checkpoint must agree on with an env: {"task": name, "blueprints": [...]} of an
    Esper env, {} for any other env. The blueprint library is part of the action space's
    meaning: GERMINATE action b picks `blueprints[b]`, so the same index on a reordered
    library is another blueprint. `"show_context": True` when the env appends the context's
    factors to the globals (evaluation must then show them too); `"gate": rule` when it is behind
    the schedule gate (esper_gym.agents.gate), with `"gate_plans"`, the digest of its plans."""
    task = getattr(env.unwrapped, "task", None)
    if task is None or not hasattr(task, "blueprints"):
        return {}
    record = {"task": str(task.name), "blueprints": [str(b) for b in task.blueprints]}
    if getattr(env.unwrapped, "show_context", False):
        record["show_context"] = True
    from esper_gym.agents.gate import gate_of, plans_digest

    gate = gate_of(env)
    if gate is not None:  # the agent acts behind the schedule gate (evaluation too)
        record["gate"] = gate
        record["gate_plans"] = plans_digest(env.unwrapped.base_task.name, gate)
    return record


def mixture_record(records: list[dict]) -> dict:
    """The `env_record` of training on several tasks: their names joined by "+" (a resumed run
    must mix the same tasks), their shared blueprint library. Tasks whose libraries differ are
    refused: the same GERMINATE index would mean another blueprint in each."""
    if len(records) == 1:
        return records[0]
    first = records[0]
    for rec in records[1:]:
        if rec.get("blueprints") != first.get("blueprints"):
            raise ValueError(
                f"task {rec.get('task')!r} has the blueprint library {rec.get('blueprints')}, "
                f"task {first.get('task')!r} has {first.get('blueprints')}: one policy's "
                "GERMINATE actions cannot mean both; give every task the same library"
            )
    names = [str(rec.get("task")) for rec in records]
    mixed = {"task": "+".join(names), "tasks": names, "blueprints": first.get("blueprints")}
    if any(rec.get("show_context") for rec in records):
        mixed["show_context"] = True
    if first.get("gate") is not None:  # env.gate is the run's: every task has the same
        mixed["gate"] = first["gate"]
        joined = "+".join(str(rec.get("gate_plans")) for rec in records)
        mixed["gate_plans"] = hashlib.sha256(joined.encode()).hexdigest()
    return mixed


def check_env_record(saved: dict, current: dict, checkpoint, *, same_task: bool) -> None:
    """Refuse a checkpoint whose recorded blueprint library (and, with `same_task`, task)
    differs from `current` (an `env_record`). Nothing to check against a non-Esper env."""
    if not current:
        return
    if not isinstance(saved, dict) or not {"task", "blueprints"} <= set(saved):
        raise ValueError(
            f"checkpoint {checkpoint} records no task or blueprint library (written by an older "
            "esper-gym, or by save_checkpoint without env=), so its GERMINATE actions cannot be "
            f"matched to task {current['task']!r}'s blueprints {current['blueprints']}"
        )
    if same_task and saved["task"] != current["task"]:
        raise ValueError(
            f"checkpoint {checkpoint} is for task {saved['task']!r}; this run's task is "
            f"{current['task']!r}: resume a checkpoint of the same task"
        )
    if saved.get("gate") != current.get("gate"):
        raise ValueError(
            f"checkpoint {checkpoint} was trained behind the schedule gate "
            f"{saved.get('gate')!r}, this env is behind {current.get('gate')!r} (None: no "
            "gate): set env.gate as it was trained"
        )
    if (
        saved["task"] == current["task"]
        and "gate_plans" in saved  # older gated checkpoints did not record it
        and saved["gate_plans"] != current.get("gate_plans")
    ):
        raise ValueError(
            f"checkpoint {checkpoint} was trained behind other plans of gate {saved['gate']!r} "
            f"(digest {saved['gate_plans'][:12]}) than conf/schedule_plans.yaml now gives task "
            f"{current['task']!r} ({str(current.get('gate_plans'))[:12]}): restore the plans it "
            "was trained behind"
        )
    if list(saved["blueprints"]) != list(current["blueprints"]):
        raise ValueError(
            f"checkpoint {checkpoint} was trained with the blueprint library "
            f"{list(saved['blueprints'])}, but task {current['task']!r} has "
            f"{list(current['blueprints'])}: the same GERMINATE action would pick another "
            "blueprint; use the library (names and order) it was trained with"
        )
