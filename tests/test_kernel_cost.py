"""Kernels that pass validation and still do harm (issue 22): a kernel's cost is bounded before
it runs, a finite but huge output is a fault charged to its seed, and an archive that torch
cannot load is a one-line refusal."""

import dataclasses
import hashlib
import json
import math
import pickle
import re
import time

import gymnasium as gym
import numpy as np
import pytest
import torch

import esper_gym  # noqa: F401  (registers the ids)
from esper_gym import vector as vec
from esper_gym.actions import ADVANCE, GERMINATE, Action
from esper_gym.kasmina import recovery
from esper_gym.kasmina.recovery import guarded_call
from esper_gym.kernels import (
    BLUEPRINTS,
    DEFAULT_LIBRARY,
    EXTRA_LIBRARY,
    FAULT_LIBRARY,
    KernelCache,
    KernelCost,
    KernelRejected,
    KernelStore,
    KernelTemplate,
    compile_blueprint,
    load_artifact,
    load_or_compile,
    validate_artifact,
)
from esper_gym.kernels.kernel import COST_FACTOR, COST_FLOOR, cost_problem, template_cost
from tests.conftest import SMALL
from tests.hostile import (
    MODEL_JSON,
    HugeDelta,
    QuadraticAttention,
    exported,
    members,
    plain_zip,
    schema_mismatch,
)

SHAPE = (32,)
REPEATS = 64  # the attack's sequence: 64 copies of residual_mlp's 64 hidden units, L = 4096


@pytest.fixture(scope="module")
def mlp():
    blueprint = BLUEPRINTS["residual_mlp"]()
    return (blueprint, *compile_blueprint(blueprint, SHAPE))


def _meta_for(evil, like):
    return dataclasses.replace(like, sha256=hashlib.sha256(evil).hexdigest(), size_bytes=len(evil))


def _poison(kernel_dir, env, layer, name, make):
    """File `make(the proposed blueprint's own layers)`, exported, under the genuine recipe the
    env will ask for when it germinates `name` on `layer`, as a poisoned shared store would."""
    core = env.unwrapped
    blueprint = core.generator.propose(layer.out_shape, name, core.task.param_budget)
    _, meta = compile_blueprint(blueprint, layer.out_shape)
    evil = exported(make(blueprint.build(layer.out_shape)), layer.out_shape)
    KernelStore(kernel_dir).put(evil, _meta_for(evil, meta))
    return blueprint, _meta_for(evil, meta)


# --- 5. cost bounded before the kernel runs ---------------------------------------------------


def test_quadratic_attention_passes_every_other_check_and_its_cost_is_refused(mlp):
    blueprint, artifact, meta = mlp
    evil = exported(QuadraticAttention(*blueprint.build(SHAPE), repeats=REPEATS), SHAPE)
    # Statically it is a residual_mlp: allowed ops only, right shapes, the same tensors, and
    # its graph's own outputs stay far under the intermediates bound.
    assert validate_artifact(evil).output_shape == SHAPE
    template = KernelTemplate.from_program(load_artifact(evil))  # no blueprint: not compared
    reference = KernelTemplate.from_program(load_artifact(artifact, meta))
    shapes = {name: t.shape for name, t in zip(template.names, template.tensors)}
    assert shapes == {name: t.shape for name, t in zip(reference.names, reference.tensors)}
    # What the dry run counted: the L x L scores of the attention, on shapes only.
    length = REPEATS * blueprint.hidden
    cost = template.cost
    assert cost.bytes >= length * length * 4 and cost.flops >= 2 * length * length
    assert cost.flops > 1000 * reference.cost.flops and cost.bytes > 1000 * reference.cost.bytes
    start = time.perf_counter()
    with pytest.raises(KernelRejected) as refused:
        load_artifact(evil, _meta_for(evil, meta))
    assert time.perf_counter() - start < 2.0
    message = str(refused.value)
    sha = hashlib.sha256(evil).hexdigest()
    assert message.startswith(f"kernel {sha}: costs {cost.flops:.3g} FLOPs and {cost.bytes:.3g}")
    budget = max(COST_FACTOR * reference.cost.flops, COST_FLOOR.flops)
    assert f"budget is {budget:.3g} FLOPs" in message and "residual_mlp" in message


def test_a_poisoned_store_cannot_stall_an_episode(tmp_path):
    env = gym.make("Esper/Spirals-v0", kernel_dir=tmp_path / "store", **SMALL)
    core = env.unwrapped
    env.reset(seed=0)
    layer, name = core.layers[1], "residual_mlp"
    blueprint, meta = _poison(
        tmp_path / "store", env, layer, name, lambda m: QuadraticAttention(*m, repeats=REPEATS)
    )
    action = core.layout.encode(Action(GERMINATE, 1, 0, core.task.blueprints.index(name)))
    start = time.perf_counter()
    _, _, terminated, _, info = env.step(action)
    assert time.perf_counter() - start < 10.0  # one step of the small task, not a stall
    assert info["fault_kinds"] == ["load"] and not terminated
    assert layer.slots[0].state.name == "DORMANT" and meta.sha256 not in core.cache
    with pytest.raises(KernelRejected, match=rf"kernel {meta.sha256}: costs .* budget is"):
        load_or_compile(blueprint, layer.out_shape, core.store, core.cache)
    env.close()


def test_the_budget_is_a_factor_of_the_template_or_the_floor():
    conv, shape = BLUEPRINTS["conv3x3"](), (16, 8, 8)
    ref = template_cost(json.dumps(conv.to_dict(), sort_keys=True), shape)
    floor = COST_FLOOR
    assert 8 * ref.flops > floor.flops and 8 * ref.bytes > floor.bytes  # the factor applies

    def problem(cost, blueprint=conv, shape=shape):
        return cost_problem(cost, blueprint.to_dict(), shape)

    assert problem(KernelCost(7.9 * ref.flops, 7.9 * ref.bytes)) is None
    assert "costs" in problem(KernelCost(8.1 * ref.flops, ref.bytes))
    assert "costs" in problem(KernelCost(ref.flops, 8.1 * ref.bytes))
    wide = dataclasses.replace(conv, width=4 * conv.width)  # a bigger template, a bigger budget
    assert problem(KernelCost(8.1 * ref.flops, 8.1 * ref.bytes), wide) is None
    # A tiny template (norm on D=2: a few dozen FLOPs) gets the floor.
    norm = BLUEPRINTS["norm"]()
    assert problem(KernelCost(0.9 * floor.flops, 0.9 * floor.bytes), norm, (2,)) is None
    assert "costs" in problem(KernelCost(1.1 * floor.flops, 1), norm, (2,))
    assert "cannot be built" in cost_problem(KernelCost(1, 1), {"name": "nope"}, shape)


@pytest.mark.parametrize("shape", [(32,), (16, 8, 8)])
def test_every_shipped_blueprint_costs_what_its_template_costs(shape):
    for name in (*DEFAULT_LIBRARY, *EXTRA_LIBRARY, *FAULT_LIBRARY):
        blueprint = BLUEPRINTS[name]()
        if not blueprint.supports(shape):
            continue
        artifact, meta = compile_blueprint(blueprint, shape)
        cost = KernelTemplate.from_program(load_artifact(artifact, meta)).cost  # not refused
        ref = template_cost(json.dumps(meta.blueprint, sort_keys=True), shape)
        assert 0.9 < cost.flops / ref.flops < 1.1 and 0.9 < cost.bytes / ref.bytes < 1.1, name


# --- 8. a finite but huge output is the seed's fault ------------------------------------------


def test_guarded_call_bounds_the_output_by_the_input():
    x = torch.full((4, 8), 0.5)
    huge = guarded_call(lambda t: t * 0 + 3e38, x, None)
    assert huge[:2] == (None, "magnitude") and "3e+38" in huge[2]
    # 1e4 x (1 + max |x|) = 1.5e4: just under is a delta, just over is a fault.
    assert guarded_call(lambda t: t * 0 + 1.4e4, x, None)[1] is None
    assert guarded_call(lambda t: t * 0 - 1.6e4, x, None)[1] == "magnitude"
    assert guarded_call(lambda t: t * 1e3, x * 1e6, None)[1] is None  # a large host: in scale
    assert guarded_call(lambda t: t * float("nan"), x, None)[1] == "nonfinite"
    # A host that already overflowed (x Inf) gets no bound: its divergence is not the seed's.
    assert guarded_call(lambda t: torch.full_like(t, 3e38), x * math.inf, None)[1] is None


def _huge_episode(kernel_dir, steps=4):
    env = gym.make("Esper/Spirals-v0", kernel_dir=kernel_dir, **SMALL)
    core = env.unwrapped
    env.reset(seed=1)
    layer = core.layers[1]
    _poison(kernel_dir, env, layer, "residual_mlp", lambda m: HugeDelta(*m))
    germinate = core.layout.encode(
        Action(GERMINATE, 1, 0, core.task.blueprints.index("residual_mlp"))
    )
    advance = core.layout.encode(Action(ADVANCE, 1, 0))
    infos = []
    for action in (germinate, advance, advance, 0)[:steps]:
        _, reward, terminated, _, info = env.step(action)
        infos.append((reward, terminated, info, layer.slots[0].state.name))
        if terminated:
            break
    env.close()
    return infos


def test_a_huge_output_trips_the_breaker_and_the_host_lives(tmp_path, monkeypatch):
    infos = _huge_episode(tmp_path / "a")
    _, _, info, state = infos[1]  # TRAINING: three faults, the breaker (max_faults 3) culls
    assert info["fault_kinds"] == ["magnitude"] * 3 and state == "EMBARGOED"
    assert not any(terminated or i["diverged"] for _, terminated, i, _ in infos)
    assert all(i["val_acc"] > 0 for _, _, i, _ in infos)
    # Control: without the bound the same kernel runs into BLENDING and the host's loss
    # overflows, charged to nobody.
    monkeypatch.setattr(recovery, "MAGNITUDE_FACTOR", math.inf)
    _, terminated, info, _ = _huge_episode(tmp_path / "b")[-1]
    assert terminated and info["diverged"] and info["faults_total"] == 0


def test_a_huge_output_is_the_same_fault_in_the_batched_env(kernel_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(vec, "VMAP_MIN", 2)  # copies 1 and 2 run as one stacked group
    vmapped, real = [], vec._vmapped_call

    def counting(*args):
        result = real(*args)
        vmapped.append(result is not None)
        return result

    monkeypatch.setattr(vec, "_vmapped_call", counting)
    store = tmp_path / "store"
    envs = gym.make_vec(
        "Esper/Spirals-v0", num_envs=3, vectorization_mode="vector_entry_point",
        kernel_dir=str(store), **SMALL,
    )  # fmt: skip
    envs.reset(seed=0)
    first = envs.envs[0]
    _poison(store, first, first.layers[1], "residual_mlp", lambda m: HugeDelta(*m))
    layout, blueprints = first.layout, first.task.blueprints
    germinate = layout.encode(Action(GERMINATE, 1, 0, blueprints.index("residual_mlp")))
    advance = layout.encode(Action(ADVANCE, 1, 0))
    expected = _huge_episode(str(store))  # copy 1's single env (seed 1), same store
    for step, action in enumerate((germinate, advance, advance, 0)):
        _, rewards, terminated, _, infos = envs.step(np.array([0, action, action]))
        reward, _, info, state = expected[step]
        for i in (1, 2):
            assert list(infos["fault_kinds"][i]) == info["fault_kinds"], (step, i)
        assert list(infos["fault_kinds"][0]) == [] and not terminated.any()
        assert rewards[1] == reward and envs.envs[1].layers[1].slots[0].state.name == state
        assert not infos["diverged"].any()
    assert expected[1][2]["fault_kinds"] == ["magnitude"] * 3 and any(vmapped)
    envs.close()


# --- 9. an archive the checks pass and torch cannot load --------------------------------------


def _archive_version(artifact):
    content = members(artifact)
    content["archive/archive_version"] = b"99"
    return plain_zip(content)


def _dangling_tensor(artifact):
    content = members(artifact)
    doc = json.loads(content[MODEL_JSON])
    doc["graph_module"]["graph"]["nodes"][0]["inputs"][0]["arg"]["as_tensor"]["name"] = "gone"
    content[MODEL_JSON] = json.dumps(doc).encode()
    return plain_zip(content)


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (schema_mismatch, "SerializeError: Serialized schema version"),
        (_archive_version, "ValueError: Saved archive version 99"),
        (_dangling_tensor, "KeyError: 'gone'"),
    ],
)
def test_an_archive_torch_cannot_load_is_a_one_line_refusal(tmp_path, mlp, tamper, reason):
    _, artifact, meta = mlp
    evil = tamper(artifact)
    evil_meta = _meta_for(evil, meta)
    assert validate_artifact(evil, evil_meta).input_shape == SHAPE  # the static checks pass
    head = f"kernel {evil_meta.sha256}: torch.export.load failed: {reason}"
    with pytest.raises(KernelRejected) as refused:
        load_artifact(evil, evil_meta)
    assert str(refused.value).startswith(head) and "\n" not in str(refused.value)
    store = KernelStore(tmp_path / "store")
    store.put(evil, evil_meta)
    with pytest.raises(KernelRejected, match="^" + re.escape(head)):
        KernelCache(store).kernel(evil_meta.sha256, expected_shape=SHAPE)
    # A pickled kernel whose artifact was swapped for it, unpickled: refused alike.
    store.put(artifact, meta)
    kernel = KernelCache(store).kernel(meta.sha256)
    kernel.artifact, kernel.meta = evil, evil_meta
    with pytest.raises(KernelRejected, match="^" + re.escape(head)):
        pickle.loads(pickle.dumps(kernel))


def test_an_unloadable_artifact_in_an_episode_is_a_load_fault(tmp_path):
    env = gym.make("Esper/Spirals-v0", kernel_dir=tmp_path / "store", **SMALL)
    core = env.unwrapped
    env.reset(seed=0)
    layer, name = core.layers[1], "residual_mlp"
    blueprint = core.generator.propose(layer.out_shape, name, core.task.param_budget)
    artifact, meta = compile_blueprint(blueprint, layer.out_shape)
    evil = schema_mismatch(artifact)
    core.store.put(evil, _meta_for(evil, meta))
    action = core.layout.encode(Action(GERMINATE, 1, 0, core.task.blueprints.index(name)))
    _, _, terminated, _, info = env.step(action)
    assert info["fault_kinds"] == ["load"] and not terminated
    with pytest.raises(KernelRejected, match=r"torch\.export\.load failed: SerializeError"):
        load_or_compile(blueprint, layer.out_shape, core.store, core.cache)
    _, _, terminated, _, info = env.step(0)  # the run goes on, on the host path
    assert not terminated and info["val_acc"] > 0
    env.close()
