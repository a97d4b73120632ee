"""Blueprints, generator, compiler: every template compiles, loads and matches its eager module."""

import dataclasses
import pickle
import re
import time

import pytest
import torch

from esper_gym.kernels import (
    BLUEPRINTS,
    DEFAULT_LIBRARY,
    EXTRA_LIBRARY,
    FAULT_LIBRARY,
    BlueprintGenerator,
    KernelMetadata,
    KernelRejected,
    blueprint_from_dict,
    compile_blueprint,
    instantiate,
    load_artifact,
    recipe_key,
)

# Slot shapes of the hosts we ship: Linear widths and small Conv2d activations.
LINEAR_SHAPES = [(16,), (64,), (128,)]
CONV_SHAPES = [(8, 14, 14), (16, 8, 8), (32, 8, 8)]
SHAPES = LINEAR_SHAPES + CONV_SHAPES
CASES = [
    (name, shape)
    for name in DEFAULT_LIBRARY
    for shape in SHAPES
    if BLUEPRINTS[name]().supports(shape)
]
FAULT_CASES = [(name, shape) for name in FAULT_LIBRARY for shape in ((16,), (8, 14, 14))]


def _build(blueprint, shape, seed=0):
    # The same seeding compile_blueprint uses, so weights must match the artifact's.
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        return blueprint.build(shape)


@pytest.fixture(scope="module")
def compiled():
    """(name, shape) -> (artifact bytes, metadata), compiled once for the whole module."""
    return {
        (name, shape): compile_blueprint(BLUEPRINTS[name](), shape)
        for name, shape in CASES + FAULT_CASES
    }


def test_libraries():
    assert len(DEFAULT_LIBRARY) == 8 and len(set(DEFAULT_LIBRARY)) == 8
    assert DEFAULT_LIBRARY[0] == "residual_mlp" and DEFAULT_LIBRARY[-1] == "attention"
    assert FAULT_LIBRARY == ("fault_raise", "fault_nan", "fault_shape", "fault_slow")
    assert EXTRA_LIBRARY == ("activation",)  # appended by blueprints=with_activation
    assert set(BLUEPRINTS) == set(DEFAULT_LIBRARY) | set(EXTRA_LIBRARY) | set(FAULT_LIBRARY)
    assert not any(BLUEPRINTS[n].is_fault for n in DEFAULT_LIBRARY + EXTRA_LIBRARY)
    assert all(BLUEPRINTS[n].is_fault for n in FAULT_LIBRARY)
    for name in FAULT_LIBRARY:
        assert set(BLUEPRINTS[name].host_kinds) == {"linear", "conv"}
    # Every slot shape of the shipped hosts has several real templates to choose from.
    for shape in SHAPES:
        assert sum(BLUEPRINTS[n]().supports(shape) for n in DEFAULT_LIBRARY) >= 4


@pytest.mark.parametrize(("name", "shape"), CASES, ids=[f"{n}-{s}" for n, s in CASES])
def test_template_round_trip(compiled, name, shape):
    blueprint = BLUEPRINTS[name]()
    artifact, meta = compiled[name, shape]
    assert meta.input_shape == shape and meta.output_shape == shape
    assert meta.blueprint == blueprint.to_dict() and meta.size_bytes == len(artifact)
    eager = _build(blueprint, shape)
    n_params = sum(p.numel() for p in eager.parameters())
    assert n_params == blueprint.param_count(shape) == meta.param_count > 0

    loaded = instantiate(load_artifact(artifact, meta, expected_shape=shape))
    # Same seed, same initial weights; and a new seed changes nothing: exact zero delta.
    loaded_params = loaded.named_state()
    assert loaded_params.keys() == dict(eager.named_parameters()).keys()
    for key, p in eager.named_parameters():
        assert torch.equal(loaded_params[key], p), key
    x = torch.randn(5, *shape)
    assert torch.equal(loaded(x), torch.zeros_like(x))

    # Zero-init makes outputs trivially equal, so move both off zero identically and compare.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for key, p in eager.named_parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
            loaded_params[key].copy_(p)
    for batch in (1, 7, 33):
        x = torch.randn(batch, *shape)
        expected = eager(x)
        got = loaded(x)
        assert got.shape == (batch, *shape)
        assert expected.abs().max() > 0
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", DEFAULT_LIBRARY)
def test_param_count_exact_across_sizes(name):
    prototype = BLUEPRINTS[name]()
    for shape in SHAPES:
        if not prototype.supports(shape):
            continue
        sizes = prototype.sizes(shape) if prototype.size_field else [None]
        for size in {sizes[0], sizes[len(sizes) // 2], sizes[-1]}:
            blueprint = prototype
            if size is not None:
                blueprint = dataclasses.replace(prototype, **{prototype.size_field: size})
            module = blueprint.build(shape)
            assert blueprint.param_count(shape) == sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    ("name", "shape", "why"),
    [
        ("residual_mlp", (8, 14, 14), "linear"),
        ("conv3x3", (16,), "conv"),
        ("depthwise_separable", (64,), "conv"),
        ("bottleneck", (128,), "conv"),
        ("attention", (12,), "token size 8 must divide D=12"),
        ("low_rank", (4, 4), "(4, 4)"),
        ("norm", (0,), "(0,)"),
        ("fault_raise", (1, 2, 3, 4), "(1, 2, 3, 4)"),
    ],
)
def test_unsupported_shape_raises(name, shape, why):
    blueprint = BLUEPRINTS[name]()
    assert not blueprint.supports(shape)
    with pytest.raises(ValueError, match=re.escape(str(tuple(shape)))):
        blueprint.build(shape)
    with pytest.raises(ValueError) as err:
        blueprint.param_count(shape)
    assert why in str(err.value)


def test_blueprint_dicts():
    for name in DEFAULT_LIBRARY + FAULT_LIBRARY:
        blueprint = BLUEPRINTS[name]()
        d = blueprint.to_dict()
        assert d["name"] == name
        assert blueprint_from_dict(d) == blueprint
    assert blueprint_from_dict({"name": "residual_mlp", "hidden": 7}).hidden == 7
    with pytest.raises(ValueError, match=r"known blueprints: .*'attention'"):
        blueprint_from_dict({"name": "transformer_xl"})
    with pytest.raises(ValueError, match="bad fields"):
        blueprint_from_dict({"name": "low_rank", "width": 3})
    with pytest.raises(ValueError, match="multiple of heads"):
        BLUEPRINTS["attention"](heads=3, dim=16)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        BLUEPRINTS["low_rank"](rank=0)


def test_compile_is_deterministic_and_leaves_global_rng_alone(compiled):
    blueprint, shape = BLUEPRINTS["residual_mlp"](), (16,)
    state = torch.get_rng_state()
    artifact, meta = compile_blueprint(blueprint, shape)
    assert torch.equal(torch.get_rng_state(), state)
    first, first_meta = compiled["residual_mlp", shape]
    assert artifact == first and meta.sha256 == first_meta.sha256
    assert meta.recipe_key == recipe_key(blueprint, shape) == first_meta.recipe_key
    _, other_meta = compile_blueprint(blueprint, shape, seed=1)
    assert other_meta.sha256 != meta.sha256
    assert other_meta.recipe_key == recipe_key(blueprint, shape, seed=1) != meta.recipe_key
    assert recipe_key(blueprint, (64,)) != meta.recipe_key
    assert KernelMetadata.from_json(meta.to_json()) == meta


@pytest.mark.parametrize("shape", [(16,), (8, 14, 14)])
def test_faults_happen_after_loading(compiled, shape):
    x = torch.randn(4, *shape)
    run = {
        name: instantiate(load_artifact(*compiled[name, shape], expected_shape=shape))
        for name in FAULT_LIBRARY
    }
    with pytest.raises(RuntimeError, match="injected kernel fault"):
        run["fault_raise"](x)
    with pytest.raises(RuntimeError, match="injected kernel fault"):
        run["fault_raise"](torch.zeros(1, *shape))

    assert not torch.isfinite(run["fault_nan"](x)).any()

    wrong = (shape[0] + 1, *shape[1:])
    assert compiled["fault_shape", shape][1].output_shape == wrong
    assert run["fault_shape"](x).shape == (4, *wrong)

    slow = run["fault_slow"](x)
    assert slow.shape == x.shape and torch.equal(slow, torch.zeros_like(x))


def _best_ms(module, x, repeats=3):
    module(x)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        module(x)
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


def test_fault_slow_is_slow(compiled):
    shape = (16,)
    x = torch.randn(128, *shape)
    slow = instantiate(load_artifact(*compiled["fault_slow", shape]))
    normal = instantiate(load_artifact(*compiled["low_rank", shape]))
    with torch.no_grad():
        slow_ms, normal_ms = _best_ms(slow, x), _best_ms(normal, x)
    assert slow_ms > 10 * normal_ms and slow_ms > 5.0, (slow_ms, normal_ms)


def test_generator_respects_budgets():
    generator = BlueprintGenerator()
    for shape in SHAPES:
        for kind in DEFAULT_LIBRARY:
            prototype = BLUEPRINTS[kind]()
            if not prototype.supports(shape):
                assert not generator.fits(shape, kind, 10**9)
                with pytest.raises(ValueError, match="does not support slot shape"):
                    generator.propose(shape, kind, 10**9)
                continue
            for budget in (50, 500, 5_000, 50_000):
                fits = generator.fits(shape, kind, budget)
                if not fits:
                    with pytest.raises(ValueError, match=f"budget is {budget}"):
                        generator.propose(shape, kind, budget)
                    continue
                blueprint = generator.propose(shape, kind, budget)
                assert blueprint.param_count(shape) <= budget
                if prototype.size_field is None:
                    continue
                # The largest that fits: one size step more would exceed the budget.
                sizes = list(prototype.sizes(shape))
                size = getattr(blueprint, prototype.size_field)
                if size != sizes[-1]:
                    bigger = dataclasses.replace(
                        blueprint, **{prototype.size_field: sizes[sizes.index(size) + 1]}
                    )
                    assert bigger.param_count(shape) > budget


def test_generator_examples_and_errors():
    generator = BlueprintGenerator()
    # residual_mlp on D=64: 2*64*h + h + 64 <= 5000  ->  h = 38 (38 -> 4966, 39 -> 5095).
    assert generator.propose((64,), "residual_mlp", 5000).hidden == 38
    assert generator.propose((64,), "low_rank", 1000).rank == 7  # 2*64*r
    assert generator.propose((64,), "residual_mlp") == BLUEPRINTS["residual_mlp"]()
    assert generator.propose((16, 8, 8), "norm", 32) == BLUEPRINTS["norm"]()
    assert generator.fits((16, 8, 8), "norm", 32) and not generator.fits((16, 8, 8), "norm", 31)
    with pytest.raises(ValueError, match=r"needs at least 32 parameters; the budget is 31"):
        generator.propose((16, 8, 8), "norm", 31)
    with pytest.raises(ValueError, match=r"'conv5x5' is not in the library \('residual_mlp'"):
        generator.propose((64,), "conv5x5", 1000)
    assert not generator.fits((64,), "conv5x5", 1000)
    small = BlueprintGenerator(library=("low_rank", "norm"))
    with pytest.raises(ValueError, match="not in the library"):
        small.propose((64,), "residual_mlp", 10_000)
    with pytest.raises(ValueError, match="unknown blueprint kinds"):
        BlueprintGenerator(library=("low_rank", "nope"))
    faults = BlueprintGenerator(library=DEFAULT_LIBRARY + FAULT_LIBRARY)
    assert faults.propose((64,), "fault_nan", 0).name == "fault_nan"


def test_instantiate_gives_independent_parameters(compiled):
    shape = (16,)
    artifact, meta = compiled["residual_mlp", shape]
    program = load_artifact(artifact, meta)
    before = {k: v.clone() for k, v in program.state_dict.items()}
    first, second = instantiate(program), instantiate(program)
    for (_, p1), (_, p2) in zip(first.named_parameters(), second.named_parameters()):
        assert p1.requires_grad and p1.data_ptr() != p2.data_ptr()
    optimizer = torch.optim.SGD(first.parameters(), lr=0.5)
    x, target = torch.randn(8, *shape), torch.randn(8, *shape)
    for _ in range(3):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(first(x), target).backward()
        optimizer.step()
    assert first(x).abs().max() > 0  # it learned: no longer a zero delta
    assert torch.equal(second(x), torch.zeros_like(x))
    for key, value in program.state_dict.items():
        assert torch.equal(value, before[key]), key
    assert torch.equal(instantiate(program)(x), torch.zeros_like(x))


def test_kernel_pickles_with_its_optimizer_and_is_revalidated(compiled):
    shape = (16,)
    artifact, meta = compiled["residual_mlp", shape]
    kernel = instantiate(load_artifact(artifact, meta), artifact, meta)
    optimizer = torch.optim.Adam(kernel.parameters(), lr=0.1)
    x, target = torch.randn(8, *shape), torch.randn(8, *shape)
    torch.nn.functional.mse_loss(kernel(x), target).backward()
    optimizer.step()
    kernel2, optimizer2 = pickle.loads(pickle.dumps((kernel, optimizer)))
    assert torch.equal(kernel2(x), kernel(x))
    # The optimizer still drives the unpickled kernel's own parameters.
    assert {id(p) for p in kernel2.parameters()} == {
        id(p) for g in optimizer2.param_groups for p in g["params"]
    }
    # A tampered artifact inside a pickled kernel is refused when it is loaded back.
    kernel.artifact = artifact[:-40] + bytes(40)
    with pytest.raises(KernelRejected):
        pickle.loads(pickle.dumps(kernel))
    with pytest.raises(TypeError, match="without its artifact"):
        pickle.dumps(instantiate(load_artifact(artifact, meta)))
