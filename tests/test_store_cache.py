"""Store, cache and the static artifact checks: corrupt or malicious artifacts never run."""

import dataclasses
import hashlib
import io
import json
import multiprocessing
import pickle
import random
import threading
import zipfile
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import nn

import esper_gym.kernels as kernels
from esper_gym.kernels import (
    BLUEPRINTS,
    Blueprint,
    KernelCache,
    KernelIncompatible,
    KernelRejected,
    KernelStore,
    compile_blueprint,
    library,
    load_or_compile,
    recipe_key,
    validate_artifact,
)

SHAPE = (16,)
SAMPLE_INPUTS = "archive/data/sample_inputs/model.pt"
WEIGHTS_CONFIG = "archive/data/weights/model_weights_config.json"
MODEL_JSON = "archive/models/model.json"


@pytest.fixture(scope="module")
def kernels16():
    """Three small (artifact, meta) pairs for slot shape (16,), of distinct sizes."""
    return [
        compile_blueprint(BLUEPRINTS[name](), SHAPE)
        for name in ("low_rank", "norm", "residual_mlp")
    ]


def _rebuild(data, replace=None, add=None):
    """A copy of zip `data` with some members' bytes replaced and members added."""
    replace, add = replace or {}, add or {}
    src = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for name in src.namelist():
            dst.writestr(name, replace.get(name, src.read(name)))
        for name, content in add.items():
            dst.writestr(name, content)
    return out.getvalue()


def _member(data, name):
    return zipfile.ZipFile(io.BytesIO(data)).read(name)


class _WritesFile:
    """Unpickling this creates `path`: proof that a pickle ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _with_evil_sample_inputs(artifact, marker, protocol):
    inner = _member(artifact, SAMPLE_INPUTS)
    root = zipfile.ZipFile(io.BytesIO(inner)).namelist()[0].split("/")[0]
    payload = pickle.dumps(_WritesFile(marker), protocol=protocol)
    evil_inner = _rebuild(inner, replace={f"{root}/data.pkl": payload})
    return _rebuild(artifact, replace={SAMPLE_INPUTS: evil_inner})


def _edit_json(artifact, name, edit):
    doc = json.loads(_member(artifact, name))
    edit(doc)
    return _rebuild(artifact, replace={name: json.dumps(doc).encode()})


# --- store -------------------------------------------------------------------------------------


def test_store_round_trip_and_persistence(tmp_path, kernels16):
    store = KernelStore(tmp_path / "kernels")
    assert len(store) == 0 and store.shas() == []
    for artifact, meta in kernels16:
        assert store.put(artifact, meta) == meta.sha256
    artifact, meta = kernels16[0]
    assert store.put(artifact, meta) == meta.sha256  # idempotent
    assert len(store) == 3 and meta.sha256 in store and "not-a-sha" not in store
    assert store.get(meta.sha256) == (artifact, meta)
    assert store.find(meta.recipe_key) == meta and store.find("0" * 64) is None
    path = tmp_path / "kernels" / "objects" / meta.sha256[:2] / f"{meta.sha256}.pt2"
    assert path.read_bytes() == artifact
    assert not list((tmp_path / "kernels" / "objects").rglob(".tmp-*"))

    reopened = KernelStore(tmp_path / "kernels")  # as after a process restart
    assert reopened.shas() == sorted(m.sha256 for _, m in kernels16)
    for artifact, meta in kernels16:
        assert reopened.get(meta.sha256) == (artifact, meta)
        assert reopened.meta(meta.sha256) == meta
    with pytest.raises(KeyError, match="not in the store"):
        reopened.get("f" * 64)
    with pytest.raises(ValueError, match="not a sha256"):
        reopened.get("../../etc/passwd")


def test_store_refuses_bad_checksum_and_corruption(tmp_path, kernels16):
    store = KernelStore(tmp_path)
    artifact, meta = kernels16[0]
    with pytest.raises(KernelRejected, match="does not match metadata"):
        store.put(artifact + b"x", meta)
    assert len(store) == 0
    store.put(artifact, meta)
    path = store.path(meta.sha256)
    corrupt = bytearray(artifact)
    corrupt[len(corrupt) // 2] ^= 0xFF
    path.write_bytes(bytes(corrupt))
    with pytest.raises(KernelRejected) as err:
        store.get(meta.sha256)
    assert meta.sha256 in str(err.value) and str(path) in str(err.value)
    store.put(artifact, meta)  # a put repairs the corrupt file
    assert store.get(meta.sha256)[0] == artifact
    path.unlink()
    with pytest.raises(KernelRejected, match="missing"):
        store.get(meta.sha256)


def _writer(root, items, seed):
    store = KernelStore(root)
    rng = random.Random(seed)
    for _ in range(5):
        order = list(items)
        rng.shuffle(order)
        for artifact, meta in order:
            store.put(artifact, meta)


def test_two_processes_write_concurrently(tmp_path, kernels16):
    root = tmp_path / "shared"
    ctx = multiprocessing.get_context("spawn")
    # Overlapping sets: both write kernel 1; each also writes one the other does not.
    jobs = [
        ctx.Process(target=_writer, args=(root, kernels16[:2], 0)),
        ctx.Process(target=_writer, args=(root, kernels16[1:], 1)),
    ]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(timeout=120)
    assert [job.exitcode for job in jobs] == [0, 0]
    store = KernelStore(root)
    assert store.shas() == sorted(meta.sha256 for _, meta in kernels16)
    for artifact, meta in kernels16:
        got, got_meta = store.get(meta.sha256)
        assert got == artifact and got_meta.sha256 == meta.sha256
        assert store.find(meta.recipe_key).sha256 == meta.sha256
        validate_artifact(got, got_meta, expected_shape=SHAPE)
    assert not list((root / "objects").rglob(".tmp-*"))


# --- static validation -------------------------------------------------------------------------


def test_rebuilt_copy_is_still_valid(kernels16):
    # The tampering helpers below must not be what triggers the refusals.
    artifact, _ = kernels16[0]
    info = validate_artifact(_rebuild(artifact), expected_shape=SHAPE)
    assert info.input_shape == info.output_shape == SHAPE


def test_refuses_wrong_checksum_truncation_and_crc(kernels16):
    artifact, meta = kernels16[0]
    validate_artifact(artifact, meta, expected_shape=SHAPE)
    with pytest.raises(KernelRejected, match="does not match metadata"):
        validate_artifact(artifact, dataclasses.replace(meta, sha256="0" * 64))
    with pytest.raises(KernelRejected, match="not a readable zip"):
        validate_artifact(artifact[: len(artifact) // 2])
    with pytest.raises(KernelRejected, match="not a readable zip"):
        validate_artifact(b"PK\x03\x04 definitely not a pt2 archive")
    # Flip a byte inside a stored member's data: the zip still opens, the CRC does not match.
    offset = artifact.index(_member(artifact, MODEL_JSON)[:64]) + 10
    flipped = bytearray(artifact)
    flipped[offset] ^= 0x01
    with pytest.raises(KernelRejected, match="CRC check failed"):
        validate_artifact(bytes(flipped))


def test_refuses_incompatible_shape(kernels16):
    artifact, meta = kernels16[0]
    with pytest.raises(KernelRejected, match=r"takes shape \(16,\), the slot has shape \(64,\)"):
        validate_artifact(artifact, meta, expected_shape=(64,))


@pytest.mark.parametrize("protocol", [2, 4])  # GLOBAL and STACK_GLOBAL
def test_pickle_payload_in_sample_inputs_refused_and_never_runs(tmp_path, kernels16, protocol):
    artifact, _ = kernels16[0]
    marker = tmp_path / "pwned"
    evil = _with_evil_sample_inputs(artifact, marker, protocol)
    with pytest.raises(KernelRejected, match=r"forbidden global 'io\.open'"):
        validate_artifact(evil)
    with pytest.raises(KernelRejected, match="forbidden global"):
        kernels.load_artifact(evil)
    store = KernelStore(tmp_path / "store")
    meta = dataclasses.replace(
        kernels16[0][1], sha256=hashlib.sha256(evil).hexdigest(), size_bytes=len(evil)
    )
    store.put(evil, meta)  # the store holds bytes; the cache must refuse to load them
    with pytest.raises(KernelRejected, match="forbidden global"):
        KernelCache(store).get(meta.sha256, expected_shape=SHAPE)
    assert not marker.exists()


def test_control_torch_export_load_would_run_the_payload(tmp_path, kernels16):
    # Why the static checks exist: torch itself falls back to weights_only=False here.
    marker = tmp_path / "ran"
    evil = _with_evil_sample_inputs(kernels16[0][0], marker, protocol=2)
    # It fails afterwards (AssertionError: not a tuple; under pytest's log capture, TypeError from
    # torch's own malformed log call), but only after the pickle ran.
    with pytest.raises((AssertionError, TypeError)):
        torch.export.load(io.BytesIO(evil))
    assert marker.exists()


def test_pickle_in_an_extra_member_refused(tmp_path, kernels16):
    artifact, _ = kernels16[0]
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_WritesFile(marker), protocol=2)
    # A payload inside the allowed layout that no config names is refused unread.
    evil = _rebuild(artifact, add={"archive/data/weights/weight_99": payload})
    with pytest.raises(KernelRejected, match=r"weight_99' is not referenced by a config"):
        validate_artifact(evil)
    # Any other member that looks like a pickle is scanned.
    evil = _rebuild(artifact, replace={"archive/byteorder": payload})
    with pytest.raises(KernelRejected, match=r"byteorder: pickle references forbidden global"):
        validate_artifact(evil)
    # Members outside the pt2 layout are refused outright.
    with pytest.raises(KernelRejected, match="outside the pt2 layout"):
        validate_artifact(_rebuild(artifact, add={"archive/extra/notes.pkl": payload}))
    with pytest.raises(KernelRejected, match="outside the pt2 layout"):
        validate_artifact(_rebuild(artifact, add={"archive/data/weights/model.pt": payload}))
    assert not marker.exists()


def test_use_pickle_weights_refused(tmp_path, kernels16):
    artifact, _ = kernels16[0]
    marker = tmp_path / "pwned"

    def to_pickle(doc):
        first = next(iter(doc["config"].values()))
        first["use_pickle"] = True

    config = json.loads(_member(artifact, WEIGHTS_CONFIG))["config"]
    path = "archive/data/weights/" + next(iter(config.values()))["path_name"]
    evil = _edit_json(artifact, WEIGHTS_CONFIG, to_pickle)
    evil = _rebuild(evil, replace={path: pickle.dumps(_WritesFile(marker))})
    with pytest.raises(KernelRejected, match=r"stored as a pickle \(use_pickle\)"):
        validate_artifact(evil)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda doc: doc["graph_module"]["graph"]["nodes"][0].update(
                target="torch.serialization.os.system"
            ),
            "forbidden target 'torch.serialization.os.system'",
        ),
        (
            lambda doc: doc["graph_module"]["graph"]["tensor_values"]["input"]["sizes"][0][
                "as_expr"
            ].update(expr_str="__import__('os').system('true')"),
            "refusing shape expression",
        ),
        (lambda doc: doc.update(guards_code=["import os"]), "guards_code"),
    ],
    ids=["op-target", "sympy-expr", "guards-code"],
)
def test_graph_json_code_paths_refused(kernels16, edit, message):
    with pytest.raises(KernelRejected, match=message):
        validate_artifact(_edit_json(kernels16[0][0], MODEL_JSON, edit))


# --- cache -------------------------------------------------------------------------------------


@pytest.fixture
def store3(tmp_path, kernels16):
    store = KernelStore(tmp_path / "kernels")
    for artifact, meta in kernels16:
        store.put(artifact, meta)
    return store


def _counts(cache):
    s = cache.stats
    return (s.hits, s.misses, s.evictions, s.compat_misses, s.entries)


def test_cache_hits_are_counted_exactly(store3, kernels16):
    cache = KernelCache(store3)
    meta = kernels16[0][1]
    first = cache.get(meta.sha256, expected_shape=SHAPE)
    assert _counts(cache) == (0, 1, 0, 0, 1) and cache.stats.bytes == meta.size_bytes
    for _ in range(3):
        assert cache.get(meta.sha256, expected_shape=SHAPE) is first
    assert _counts(cache) == (3, 1, 0, 0, 1)


def test_cache_evicts_least_recently_used_within_max_bytes(store3, kernels16):
    a, b, c = (meta for _, meta in kernels16)
    sizes = sorted(m.size_bytes for m in (a, b, c))
    limit = sizes[1] + sizes[2]  # any two fit, all three do not
    assert sum(sizes) > limit
    cache = KernelCache(store3, max_bytes=limit)
    held = []
    for meta in (a, b, a, c, b, b):
        cache.get(meta.sha256)
        assert cache.stats.bytes <= limit
        assert cache.stats.bytes == sum(m.size_bytes for m in (a, b, c) if m.sha256 in cache)
        held.append(cache.keys())
    # a, b | a hit (a most recent) | c evicts b | b evicts a | b hit
    assert held[3] == [a.sha256, c.sha256]
    assert held[5] == [c.sha256, b.sha256]
    assert _counts(cache) == (2, 4, 2, 0, 2)


def test_cache_does_not_keep_an_oversized_program(store3, kernels16):
    meta = kernels16[2][1]
    cache = KernelCache(store3, max_bytes=meta.size_bytes - 1)
    program = cache.get(meta.sha256)
    assert isinstance(program, torch.export.ExportedProgram)
    assert _counts(cache) == (0, 1, 1, 0, 0) and cache.stats.bytes == 0


def test_cache_compat_misses(store3, kernels16):
    cache = KernelCache(store3)
    meta = kernels16[0][1]
    with pytest.raises(KernelIncompatible, match=r"takes shape \(16,\), the slot has shape \(8,"):
        cache.get(meta.sha256, expected_shape=(8, 14, 14))
    assert _counts(cache) == (0, 0, 0, 1, 0)
    cache.get(meta.sha256, expected_shape=SHAPE)
    with pytest.raises(KernelIncompatible):
        cache.get(meta.sha256, expected_shape=(64,))  # refused from memory too
    assert _counts(cache) == (0, 1, 0, 2, 1)
    if not torch.cuda.is_available():
        with pytest.raises(KernelIncompatible, match="not available"):
            cache.get(meta.sha256, device="cuda")
        assert cache.stats.compat_misses == 3


class _PinnedZeros(nn.Module):
    def forward(self, x):
        # A factory op: export writes device=cpu into the graph as a literal.
        return x * 0 + torch.zeros(x.shape[1:], device=x.device)


@dataclass(frozen=True)
class _Pinned(Blueprint):
    name: ClassVar[str] = "pinned_test_only"
    host_kinds: ClassVar[tuple[str, ...]] = ("linear",)

    def _build(self, shape):
        return _PinnedZeros()

    def _param_count(self, shape):
        return 0


def test_a_graph_with_a_device_literal_is_refused(tmp_path, monkeypatch):
    # Factory ops (zeros(..., device=)) are not in ALLOWED_OPS: a validated graph never pins a
    # device, so every kernel the cache serves can move to any device.
    monkeypatch.setitem(BLUEPRINTS, _Pinned.name, _Pinned)  # a store row names registered ones
    store = KernelStore(tmp_path)
    artifact, meta = compile_blueprint(_Pinned(), SHAPE)
    store.put(artifact, meta)
    cache = KernelCache(store)
    with pytest.raises(KernelRejected, match=r"forbidden target 'torch.ops.aten.zeros.default'"):
        cache.get(meta.sha256, expected_shape=SHAPE, device="cpu")
    assert _counts(cache) == (0, 0, 0, 0, 0)


def test_load_or_compile_compiles_once(tmp_path, monkeypatch):
    store, cache = KernelStore(tmp_path), KernelCache(KernelStore(tmp_path))
    blueprint = BLUEPRINTS["squeeze_excite"](hidden=4)
    first, meta = load_or_compile(blueprint, SHAPE, store, cache, seed=3)
    assert len(store) == 1 and meta.recipe_key == recipe_key(blueprint, SHAPE, seed=3)
    with pytest.raises(ValueError, match="does not support slot shape"):
        load_or_compile(BLUEPRINTS["conv3x3"](), SHAPE, store, cache)

    def no_compile(*args, **kwargs):
        raise AssertionError("compiled although the store had the recipe")

    monkeypatch.setattr(library, "compile_blueprint", no_compile)
    second, again = load_or_compile(blueprint, SHAPE, store, cache, seed=3)
    assert again == meta and _counts(cache) == (1, 1, 0, 0, 1)
    x = torch.randn(4, *SHAPE)
    assert torch.equal(first(x), torch.zeros_like(x))
    with torch.no_grad():
        next(first.parameters()).add_(1.0)
    assert not torch.equal(next(first.parameters()), next(second.parameters()))


def test_stores_opened_at_once_on_a_fresh_index_all_open(tmp_path):
    # Switching a new index to WAL from two connections at once deadlocks on the lock upgrade and
    # SQLite fails one of them at once; without a retry ~3% of such pairs failed (CI saw one).
    failures = []
    for trial in range(200):
        root = tmp_path / str(trial)
        barrier = threading.Barrier(2)

        def open_store(root=root, barrier=barrier):
            barrier.wait()
            try:
                KernelStore(root)
            except Exception as err:  # collected and asserted on below
                failures.append(err)

        threads = [threading.Thread(target=open_store) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert failures == []


def test_hostile_index_rows_and_objects_are_refused_in_one_line(tmp_path):
    """A shared store's object that is a directory, metadata nested 200k deep or naming an
    unhashable blueprint: each a KernelRejected naming the kernel, never a raw error; and
    load_or_compile (what a GERMINATE calls, and the env turns into a `load` fault) says so."""
    import os
    import sqlite3

    store = KernelStore(tmp_path)
    cache = KernelCache(store)
    blueprint = BLUEPRINTS["low_rank"]()
    _, meta = load_or_compile(blueprint, SHAPE, store, cache)
    path = store.path(meta.sha256)
    os.unlink(path)
    os.mkdir(path)
    with pytest.raises(KernelRejected, match=f"{meta.sha256}.pt2: not a regular file"):
        store.get(meta.sha256)
    os.rmdir(path)

    def tamper(text):
        with sqlite3.connect(tmp_path / "index.sqlite") as db:
            db.execute("UPDATE kernels SET meta = ? WHERE sha256 = ?", (text, meta.sha256))

    deep = json.loads(meta.to_json())
    deep["blueprint"] = {"name": "low_rank", "rank": "[" * 4000 + "]" * 4000}
    for text, message in [
        ("[" * 200_000 + "]" * 200_000, "metadata must be JSON text of at most"),
        (json.dumps(deep).replace('"[[', "[[").replace(']]"', "]]"), "nested too deeply"),
        (meta.to_json().replace('"name": "low_rank"', '"name": ["x"]'), "unknown blueprint"),
        (meta.to_json().replace('"rank": 4', '"rank": 1e9'), "rank=1000000000.0 must be"),
    ]:
        tamper(text)
        with pytest.raises(KernelRejected, match=f"kernel {meta.sha256}: .*{message}"):
            store.meta(meta.sha256)
        with pytest.raises(KernelRejected, match=f"recipe {meta.recipe_key}: .*{message}"):
            load_or_compile(blueprint, SHAPE, store, KernelCache(store))


def test_two_recipes_of_the_same_bytes_both_load(tmp_path):
    """Recipes that differ only in what does not change the bytes (here the numerics tag: a
    store filled by native runs, then a portable run) share one content-addressed row whose
    metadata names the first recipe; the second must load, not fault."""
    from esper_gym.kernels import compiler

    store, blueprint = KernelStore(tmp_path), BLUEPRINTS["norm"]()
    _, first = load_or_compile(blueprint, SHAPE, store, KernelCache(store))
    original = compiler.numerics.tag
    try:
        compiler.numerics.tag = lambda: "another"
        _, second = load_or_compile(blueprint, SHAPE, store, KernelCache(store))
        assert second.sha256 == first.sha256  # the same bytes, one row
        _, again = load_or_compile(blueprint, SHAPE, store, KernelCache(store))  # from the index
        assert again.sha256 == first.sha256
    finally:
        compiler.numerics.tag = original
