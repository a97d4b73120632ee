"""Every template compiles, loads and runs on every slot shape of every host we ship."""

import json

import pytest
import torch

from esper_gym.hosts import build_host
from esper_gym.kasmina import kasmina_layers
from esper_gym.kernels import BlueprintGenerator, KernelCache, KernelStore, load_or_compile
from esper_gym.kernels.archive import read_members
from esper_gym.kernels.blueprints import EXTRA_LIBRARY
from esper_gym.kernels.validator import ALLOWED_OPS, op_schema_problem
from esper_gym.tasks import TASKS

# Input shape and classes per dataset, so that no dataset has to be loaded to build a host.
DATASETS = {"spirals": ((2,), 5), "fashion_mnist": ((1, 28, 28), 10), "cifar10": ((3, 32, 32), 10)}


def shipped_slots():
    """(shape, blueprint name, param budget) for every slot of every task's host, deduplicated."""
    seen = {}
    for task in TASKS.values():
        input_shape, classes = DATASETS[task.dataset]
        model = build_host(
            task.host, input_shape, classes, 1, task.seed_config(), **dict(task.host_kwargs)
        )
        # Templates a config option adds (blueprints=with_activation) ship too.
        library = (*task.blueprints, *EXTRA_LIBRARY)
        generator = BlueprintGenerator(library)
        for layer in kasmina_layers(model):
            for name in library:
                if generator.fits(layer.out_shape, name, task.param_budget):
                    seen[(layer.out_shape, name)] = task.param_budget
    return [(shape, name, budget) for (shape, name), budget in sorted(seen.items())]


SLOTS = shipped_slots()


def test_the_shipped_hosts_offer_every_template_somewhere():
    names = {name for _, name, _ in SLOTS}
    offered = {name for task in TASKS.values() for name in task.blueprints} | set(EXTRA_LIBRARY)
    assert names == offered, offered - names
    assert len({shape for shape, _, _ in SLOTS}) >= 6


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    store = KernelStore(tmp_path_factory.mktemp("store"))
    return store, KernelCache(store)


@pytest.mark.parametrize(("shape", "name", "budget"), SLOTS, ids=lambda v: str(v))
def test_template_compiles_and_runs_on_a_shipped_slot(shape, name, budget, store):
    blueprint = BlueprintGenerator((name,)).propose(shape, name, budget)
    kernel, meta = load_or_compile(blueprint, shape, *store)
    if blueprint.is_fault:
        return  # it loaded; its faults are checked where faults are (test_kernels, test_env)
    x = torch.randn(3, *shape)
    out = kernel(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert torch.equal(out, torch.zeros_like(out))  # a new seed changes nothing
    assert meta.param_count == sum(p.numel() for p in kernel.parameters()) <= budget


def test_allowed_ops_are_exactly_what_the_shipped_templates_call(store):
    # The validator's allow-list is derived from the templates: it must cover every op they
    # export to (or a shipped kernel would be refused) and hold nothing else (or it admits ops
    # no kernel needs). Store hits after the test above, so this compiles nothing new.
    used = set()
    for shape, name, budget in SLOTS:
        blueprint = BlueprintGenerator((name,)).propose(shape, name, budget)
        _, meta = load_or_compile(blueprint, shape, *store)
        artifact, _ = store[0].get(meta.sha256)
        doc = json.loads(read_members(artifact)["archive/models/model.json"])
        used |= {node["target"] for node in doc["graph_module"]["graph"]["nodes"]}
    assert used == ALLOWED_OPS, (used - ALLOWED_OPS, ALLOWED_OPS - used)
    assert all(op_schema_problem(op) is None for op in ALLOWED_OPS)
