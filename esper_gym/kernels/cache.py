"""KernelCache: loaded ExportedPrograms kept in memory, least-recently-used evicted by bytes."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from esper_gym.kernels.kernel import Kernel, KernelTemplate, check_cost, load_program
from esper_gym.kernels.store import KernelStore
from esper_gym.kernels.validator import (
    ArtifactInfo,
    KernelMetadata,
    is_fault_blueprint,
    shape_problem,
    validated_archive,
)


class KernelIncompatible(ValueError):
    """A valid kernel that cannot serve the requested slot shape or device; it was not used."""


@dataclass
class CacheStats:
    """Exact counters of a KernelCache.

    Each `get` that returns counts one hit (served from memory) or one miss (loaded from the
    store); each `get` refused as incompatible counts one compat_miss and nothing else; a `get`
    that fails otherwise (unknown sha, rejected artifact) counts nothing. `evictions` counts
    entries dropped to stay within max_bytes, including a program too big to keep at all.
    `bytes` (sum of held artifacts' size_bytes) and `entries` describe what is held now.
    `compiles` counts artifacts `load_or_compile` had to compile (the store had no recipe).
    """

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    compat_misses: int = 0
    bytes: int = 0
    entries: int = 0
    compiles: int = 0


@dataclass
class _Entry:
    program: torch.export.ExportedProgram
    meta: KernelMetadata
    info: ArtifactInfo
    artifact: bytes  # kept so that kernels made from it pickle without a store read
    template: KernelTemplate


def _device_problem(device: str | torch.device) -> str | None:
    # A validated graph holds no device literal (factory ops are not in ALLOWED_OPS), so any
    # kernel runs on any device this machine has.
    dev = torch.device(device)
    if dev.type not in ("cpu", "meta"):
        accelerator = torch.accelerator.current_accelerator(check_available=True)
        if accelerator is None or accelerator.type != dev.type:
            return f"device {dev} is not available on this machine"
    return None


class KernelCache:
    """Loaded programs from `store`, at most `max_bytes` of artifacts, least recently used evicted.

    Size is measured by artifact bytes (metadata size_bytes), a proxy for the loaded program's
    memory. A program whose artifact alone exceeds `max_bytes` is loaded and returned but not
    kept (counted as an eviction), and evicts nothing else.
    """

    def __init__(self, store: KernelStore, max_bytes: int = 64 * 2**20):
        self.store = store
        self.max_bytes = max_bytes
        self.stats = CacheStats()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        # recipe_key -> sha of what the store held for it when first asked: a germination that
        # hits memory costs no SQLite query and no re-read or re-hash of the artifact.
        self.recipes: dict[str, str] = {}

    def get(
        self,
        sha: str,
        expected_shape: Sequence[int] | None = None,
        device: str | torch.device = "cpu",
    ) -> torch.export.ExportedProgram:
        """The loaded program of kernel `sha`, checked against the slot before anything uses it.

        KernelIncompatible (counted as a compat_miss) if its input shape, or its output shape
        (except for fault blueprints), differs from `expected_shape`, or it cannot run on
        `device`. KeyError if the store lacks `sha`; KernelRejected if the artifact fails its
        checksum or static validation. The program is shared: build trainable copies with
        `kernel`, never train `program.module()` directly.
        """
        return self._entry(sha, expected_shape, device).program

    def kernel(
        self,
        sha: str,
        expected_shape: Sequence[int] | None = None,
        device: str | torch.device = "cpu",
        check_output: bool | None = None,
        blueprint: dict | None = None,
    ) -> Kernel:
        """A fresh trainable kernel of `sha` (checked as in `get`), cloned from memory.

        `check_output` (default: unless the index calls it a fault blueprint) says whether its
        output shape must equal `expected_shape`; a caller that knows which blueprint it asked
        for passes it, so that an index row cannot switch the check off. Likewise `blueprint`
        (default: the one the index names) is what the kernel's cost is bounded by.
        """
        entry = self._entry(sha, expected_shape, device, check_output, blueprint)
        return entry.template.instantiate(entry.artifact, entry.meta)

    def _entry(self, sha: str, expected_shape, device, check_output=None, blueprint=None) -> _Entry:
        entry = self._entries.get(sha)
        if entry is not None:
            meta, info = entry.meta, entry.info
        else:
            artifact, meta = self.store.get(sha)  # checksum re-verified
            # Static checks (nothing executed yet) and the rebuilt archive torch may read.
            info, canonical = validated_archive(artifact, meta)
        problem = _device_problem(device)
        if check_output is None:
            check_output = not is_fault_blueprint(meta)
        if problem is None and expected_shape is not None:
            problem = shape_problem(info, expected_shape, check_output=check_output)
        if problem is not None:
            self.stats.compat_misses += 1
            raise KernelIncompatible(f"kernel {sha}: {problem}")
        if entry is None:
            program = load_program(canonical, sha)
            entry = _Entry(program, meta, info, artifact, KernelTemplate.from_program(program))
        # Before anything runs the graph for real: its cost (counted by the dry run on shapes)
        # against its blueprint's. Checked on hits too: another caller may ask for a cheaper one.
        check_cost(entry.template.cost, blueprint or meta.blueprint, info.input_shape, sha)
        if sha in self._entries:
            self.stats.hits += 1
            self._entries.move_to_end(sha)
            return entry
        self.stats.misses += 1
        self._keep(sha, entry)
        return entry

    def _keep(self, sha: str, entry: _Entry) -> None:
        size = entry.meta.size_bytes
        if size > self.max_bytes:
            self.stats.evictions += 1
            return
        # Evict before inserting so the held bytes never exceed max_bytes, even momentarily.
        while self.stats.bytes + size > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.stats.bytes -= old.meta.size_bytes
            self.stats.evictions += 1
        self._entries[sha] = entry
        self.stats.bytes += size
        self.stats.entries = len(self._entries)

    def keys(self) -> list[str]:
        """Held shas, least recently used first (the next to be evicted)."""
        return list(self._entries)

    def __contains__(self, sha: object) -> bool:
        return sha in self._entries

    def __len__(self) -> int:
        return len(self._entries)
