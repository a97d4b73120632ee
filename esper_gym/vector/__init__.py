"""The batched simulator: N episodes of a task in one process, trained as stacked tensors.

    envs = gym.make_vec("Esper/Spirals-v0", num_envs=32, vectorization_mode="vector_entry_point")

`env` has the VectorEnv API and what it promises (equivalence with single envs, autoreset,
what copies share); `batch` the batched trainer, `stacks` the stacked tensors, `programs` a
seed graph run once for many copies.
"""

import sys
import types

from esper_gym.vector import batch as _batch
from esper_gym.vector.batch import VMAP_MIN, _vmapped_call  # noqa: F401 (settable, see _Package)
from esper_gym.vector.env import FLUSH_OUTCOMES, BatchedMorphogeneticEnv

__all__ = ["FLUSH_OUTCOMES", "VMAP_MIN", "BatchedMorphogeneticEnv"]


class _Package(types.ModuleType):
    """Setting `VMAP_MIN` (or `_vmapped_call`, which tests wrap) on the package sets it where
    the batched trainer reads it, as when this package was one module."""

    def __setattr__(self, name: str, value) -> None:
        if name in ("VMAP_MIN", "_vmapped_call"):
            setattr(_batch, name, value)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
