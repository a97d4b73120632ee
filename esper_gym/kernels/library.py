"""`load_or_compile`: the path a GERMINATE takes from a recipe to a trainable kernel module.

The recipe (blueprint, shape, seed) is looked up in the store and compiled only on a miss; the
artifact is then validated, shape-checked and loaded through the cache, and every seed gets its
own trainable copy.
"""

from collections.abc import Sequence

import torch
from torch import nn

from esper_gym.kernels.blueprints import Blueprint
from esper_gym.kernels.cache import KernelCache
from esper_gym.kernels.compiler import compile_blueprint, recipe_key
from esper_gym.kernels.kernel import Kernel
from esper_gym.kernels.store import KernelStore
from esper_gym.kernels.validator import KernelMetadata, KernelRejected


def load_or_compile(
    blueprint: Blueprint,
    shape: Sequence[int],
    store: KernelStore,
    cache: KernelCache,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, KernelMetadata]:
    """A trainable kernel module for a slot of `shape`, on `device`, and its metadata.

    Compiles only if the store has no artifact for this recipe. The artifact is checksummed,
    statically validated, checked against `shape` and `device`, and its cost (counted on shapes)
    against `blueprint`'s own (KernelRejected / KernelIncompatible) before anything from it runs.
    The module owns its parameters. A recipe the cache has seen is served from memory: no index
    query, no artifact read, no re-hash.
    """
    shape = tuple(int(s) for s in shape)
    key = recipe_key(blueprint, shape, seed=seed)
    sha = cache.recipes.get(key)
    known = sha is not None and sha in cache
    if not known:
        meta = store.find(key)
        if meta is None:
            artifact, meta = compile_blueprint(blueprint, shape, seed=seed)
            store.put(artifact, meta)
            cache.stats.compiles += 1
        sha = meta.sha256
    kernel = cache.kernel(
        sha,
        expected_shape=shape,
        device=device,
        check_output=not blueprint.is_fault,
        blueprint=blueprint.to_dict(),  # the cost budget is the asked blueprint's, not the index's
    )
    if not known:
        _check_serves(kernel, blueprint, shape)
        cache.recipes[key] = sha
    return kernel.to(device), kernel.meta


def _check_serves(kernel: Kernel, blueprint: Blueprint, shape: tuple[int, ...]) -> None:
    """The store's index is untrusted: the kernel it names for a recipe must be that recipe's.

    Its metadata must name the blueprint and shape asked for, and its tensors must have the
    names and shapes `blueprint.build(shape)` has (another template or size under a truthful
    looking row is refused). The weights' values cannot be checked short of recompiling.
    """
    meta = kernel.meta
    if meta.blueprint != blueprint.to_dict() or tuple(meta.input_shape) != shape:
        raise KernelRejected(
            f"kernel {meta.sha256}: the store serves {meta.blueprint} for shape "
            f"{tuple(meta.input_shape)}; asked for {blueprint.to_dict()} for shape {shape}"
        )
    with torch.random.fork_rng(devices=[]):
        reference = blueprint.build(shape).state_dict()
    got = {name: tuple(t.shape) for name, t in kernel.named_state().items()}
    want = {name: tuple(t.shape) for name, t in reference.items()}
    if got != want:
        raise KernelRejected(
            f"kernel {meta.sha256}: its tensors {got} are not those of {blueprint.name} {want}"
        )
