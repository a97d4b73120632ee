"""Attacks on the kernel artifact path, each crafted for real: refused, and nothing ran.

Every test here builds the hostile bytes itself. Where it is cheap, a control shows that the
crafted artifact really does what it should not when handed to torch without our checks, so a
refusal here is a refusal of a working attack, not of a broken file.
"""

import dataclasses
import hashlib
import io
import json
import os
import struct
import time
import zipfile

import pytest
import torch

from esper_gym.kernels import (
    BLUEPRINTS,
    KernelCache,
    KernelMetadata,
    KernelRejected,
    KernelStore,
    compile_blueprint,
    load_artifact,
    validate_artifact,
)
from esper_gym.kernels.archive import MAX_ARCHIVE_BYTES, pack_members, read_members
from esper_gym.kernels.validator import op_schema_problem
from tests.hostile import (
    evil_sample_inputs,
    file_writer,
    graph_node,
    input_mutator,
    plain_zip,
)
from tests.hostile import members as zip_members

SHAPE = (16,)
MODEL_JSON = "archive/models/model.json"
SAMPLE_INPUTS = "archive/data/sample_inputs/model.pt"
WEIGHTS_CONFIG = "archive/data/weights/model_weights_config.json"


@pytest.fixture(scope="module")
def norm16():
    return compile_blueprint(BLUEPRINTS["norm"](), SHAPE)


def _meta_for(evil, like):
    return dataclasses.replace(like, sha256=hashlib.sha256(evil).hexdigest(), size_bytes=len(evil))


# --- 1. ops that write files or mutate their input -----------------------------------------------


def test_control_a_from_file_graph_writes_the_file_when_torch_runs_it(tmp_path, norm16):
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"intact")
    program = torch.export.load(io.BytesIO(file_writer(norm16[0], victim)))
    program.module()(torch.randn(2, *SHAPE))
    assert victim.read_bytes() == b"AAAAAA"


def test_from_file_graph_refused_and_the_file_untouched(tmp_path, norm16):
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"intact")
    evil = file_writer(norm16[0], victim)
    with pytest.raises(KernelRejected, match=r"forbidden target 'torch.ops.aten.from_file"):
        validate_artifact(evil)
    store = KernelStore(tmp_path / "store")
    meta = _meta_for(evil, norm16[1])
    store.put(evil, meta)
    with pytest.raises(KernelRejected, match="from_file"):
        KernelCache(store).get(meta.sha256, expected_shape=SHAPE)
    assert victim.read_bytes() == b"intact"


def test_a_kernel_that_mutates_its_input_is_refused():
    # KasminaLayer hands kernels `h.detach()`, which shares the host activation's storage: an
    # in-place op there would rewrite the host. No mutating op passes, so it cannot happen.
    with pytest.raises(KernelRejected, match=r"forbidden target 'torch.ops.aten.mul_.Tensor'"):
        validate_artifact(input_mutator(SHAPE))


@pytest.mark.parametrize(
    ("op", "why"),
    [
        ("from_file.default", "string argument 'filename'"),
        ("copy_.default", "mutates"),
        ("index_put_.default", "mutates"),
        ("add.out", "mutates"),
        ("empty.memory_format", "Device"),
        ("save.default" if hasattr(torch.ops.aten, "save") else "set_.source_Storage", ""),
    ],
)
def test_schema_audit_refuses_io_and_mutation(op, why):
    problem = op_schema_problem(f"torch.ops.aten.{op}")
    assert problem is not None and why in problem


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda n: n["inputs"].append({"name": "x", "arg": {"as_graph": {"graph": {}}}}),
            "refused encoding",
        ),
        (
            lambda n: n["inputs"].append(
                {"name": "f", "arg": {"as_operator": "torch.ops.aten.from_file.default"}}
            ),
            "refused encoding",
        ),
        (lambda n: n["metadata"].update(source_fn_stack="x,torch.os.system"), "metadata"),
        (lambda n: n["metadata"].update(custom='{"a": 1}'), "metadata"),
    ],
    ids=["subgraph", "op-as-value", "source-fn", "custom-meta"],
)
def test_node_arguments_and_metadata_the_loader_resolves_are_refused(norm16, edit, message):
    members = zip_members(norm16[0])
    doc = json.loads(members[MODEL_JSON])
    edit(doc["graph_module"]["graph"]["nodes"][0])
    members[MODEL_JSON] = json.dumps(doc).encode()
    with pytest.raises(KernelRejected, match=message):
        validate_artifact(plain_zip(members))


@pytest.mark.parametrize(
    ("value", "ok"), [("tanh", True), ("/etc/passwd", False), ({"x": 1}, False)]
)
def test_string_arguments_only_where_listed(value, ok):
    # gelu's `approximate` is a mode: any other value is refused.
    artifact, _ = compile_blueprint(BLUEPRINTS["residual_mlp"](), SHAPE)
    members = zip_members(artifact)
    doc = json.loads(members[MODEL_JSON])
    gelu = next(
        n for n in doc["graph_module"]["graph"]["nodes"] if n["target"].endswith("gelu.default")
    )
    gelu["inputs"].append({"name": "approximate", "arg": {"as_string": value}, "kind": 2})
    members[MODEL_JSON] = json.dumps(doc).encode()
    if ok:
        assert validate_artifact(plain_zip(members)).input_shape == SHAPE
    else:
        with pytest.raises(KernelRejected, match="approximate"):
            validate_artifact(plain_zip(members))


# --- 2. zip parser differentials ------------------------------------------------------------------


def test_members_equal_ignoring_case_refused(tmp_path, norm16):
    marker = tmp_path / "pwned"
    artifact, _ = norm16
    for extra in ("archive/data/sample_inputs/MODEL.pt", "archive/data/sample_inputs/Model.pt"):
        members = zip_members(artifact)
        members[extra] = evil_sample_inputs(artifact, marker)
        with pytest.raises(KernelRejected, match="case-insensitive"):
            validate_artifact(plain_zip(members))
    members = zip_members(artifact)
    config = json.loads(members[WEIGHTS_CONFIG])
    for entry in config["config"].values():
        entry["use_pickle"] = True
    members["archive/data/weights/MODEL_weights_config.json"] = json.dumps(config).encode()
    with pytest.raises(KernelRejected, match="case-insensitive"):
        validate_artifact(plain_zip(members))
    assert not marker.exists()


def test_duplicate_names_prepended_and_trailing_data_refused(tmp_path, norm16):
    artifact, _ = norm16
    marker = tmp_path / "pwned"
    members = zip_members(artifact)
    members[SAMPLE_INPUTS] = evil_sample_inputs(artifact, marker)
    evil = plain_zip(members)
    with pytest.raises(KernelRejected, match="zip64 locator"):
        validate_artifact(evil + artifact)  # Python's zipfile sees the benign archive
    with pytest.raises(KernelRejected, match="data between the central directory"):
        validate_artifact(
            evil + plain_zip(zip_members(artifact))
        )  # the same, without zip64 records
    with pytest.raises(KernelRejected, match="end-of-central-directory"):
        validate_artifact(artifact + evil[:100])
    with pytest.raises(KernelRejected, match=r"(end-of-central-directory|central directory)"):
        validate_artifact(artifact + evil)  # two central directories
    with pytest.raises(KernelRejected, match="end-of-central-directory"):  # an archive comment
        validate_artifact(artifact[:-2] + struct.pack("<H", 4) + b"junk")
    # The same name twice in the central directory.
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name, content in zip_members(artifact).items():
            archive.writestr(name, content)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zipfile warns about the duplicate, then writes it
            archive.writestr(SAMPLE_INPUTS, members[SAMPLE_INPUTS])
    with pytest.raises(KernelRejected, match="duplicate member name"):
        validate_artifact(out.getvalue())
    assert not marker.exists()


def test_torch_only_ever_loads_the_rebuilt_archive(monkeypatch, norm16):
    # Whatever torch's reader would make of the original bytes, it is never given them.
    artifact, meta = norm16
    seen = []
    real_load = torch.export.load

    def spy(f, *args, **kwargs):
        data = f.getvalue()
        seen.append(data)
        return real_load(io.BytesIO(data), *args, **kwargs)

    monkeypatch.setattr(torch.export, "load", spy)
    program = load_artifact(artifact, meta)
    assert len(seen) == 1 and seen[0] != artifact
    original, rebuilt = read_members(artifact), read_members(seen[0])
    assert list(rebuilt) == list(original)
    for name, content in original.items():
        if name != SAMPLE_INPUTS:
            assert rebuilt[name] == content
    # The sample inputs are checked, then never given to torch (it would unpickle them with a
    # fallback to weights_only=False): an empty member makes it skip them.
    assert rebuilt[SAMPLE_INPUTS] == b"" and program.example_inputs is None
    assert seen[0] == pack_members(rebuilt)
    x = torch.randn(3, *SHAPE)
    assert torch.equal(program.module()(x), torch.zeros_like(x))


# --- 4. denial of service --------------------------------------------------------------------------


def _patch_sizes(data, name, method=None, size=None):
    """Rewrite the local and central headers of member `name` (method and declared sizes)."""
    data = bytearray(data)
    encoded = name.encode()
    for sig, method_at, sizes_at in ((b"PK\x03\x04", 8, 18), (b"PK\x01\x02", 10, 20)):
        start = 0
        while (at := data.find(sig, start)) >= 0:
            start = at + 4
            name_at = at + (30 if sig == b"PK\x03\x04" else 46)
            if data[name_at : name_at + len(encoded)] != encoded:
                continue
            if method is not None:
                struct.pack_into("<H", data, at + method_at, method)
            if size is not None:
                struct.pack_into("<II", data, at + sizes_at, size, size)
    return bytes(data)


def test_compressed_and_oversized_members_refused_from_the_directory(norm16):
    artifact, _ = norm16
    # A 4 GiB bzip2 member declared in a small file: refused from the central directory, before
    # any data is read or decompressed (the declared data is not even there).
    bomb = _patch_sizes(plain_zip(zip_members(artifact)), MODEL_JSON, method=zipfile.ZIP_BZIP2)
    with pytest.raises(KernelRejected, match=r"model.json' is compressed \(method 12\)"):
        validate_artifact(bomb)
    huge = _patch_sizes(plain_zip(zip_members(artifact)), MODEL_JSON, size=0xF0000000)
    with pytest.raises(KernelRejected, match="declares 4026531840 bytes"):
        validate_artifact(huge)
    with pytest.raises(KernelRejected, match=f"at most {MAX_ARCHIVE_BYTES}"):
        validate_artifact(b"\0" * (MAX_ARCHIVE_BYTES + 1))


def test_a_real_bzip2_bomb_is_refused_before_decompressing(norm16):
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_BZIP2) as archive:
        for name, content in zip_members(norm16[0]).items():
            archive.writestr(name, content)
        archive.writestr("archive/data/weights/weight_9", b"\0" * (64 * 2**20))
    bomb = out.getvalue()
    assert len(bomb) < 200_000
    start = time.perf_counter()
    with pytest.raises(KernelRejected, match="is compressed"):
        validate_artifact(bomb)
    # Decompressing 64 MiB takes far longer than parsing a directory; 0.5 s is a generous bound.
    assert time.perf_counter() - start < 0.5


# --- 5. shape expressions -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "expr",
    [
        "9**9**9",
        "Symbol('s1', positive=True, integer=True)**99999999",
        "Symbol('s1', positive=True, integer=True)*2",
        "__import__('os').system('true')",
        "s1 + 1",
    ],
)
def test_shape_expressions_beyond_a_batch_symbol_refused(norm16, expr):
    members = zip_members(norm16[0])
    doc = json.loads(members[MODEL_JSON])
    graph = doc["graph_module"]["graph"]
    graph["tensor_values"]["x" if "x" in graph["tensor_values"] else "input"]["sizes"][0][
        "as_expr"
    ]["expr_str"] = expr
    members[MODEL_JSON] = json.dumps(doc).encode()
    start = time.perf_counter()
    with pytest.raises(KernelRejected, match="refusing shape expression"):
        validate_artifact(plain_zip(members))
    assert time.perf_counter() - start < 5  # 9**9**9 evaluated would never return


def test_tensor_meta_that_does_not_fit_its_bytes_refused(norm16):
    members = zip_members(norm16[0])
    config = json.loads(members[WEIGHTS_CONFIG])
    entry = next(iter(config["config"].values()))
    members["archive/data/weights/" + entry["path_name"]] = b""  # torch would call zeros(size)
    entry["tensor_meta"]["sizes"] = [{"as_int": 2**40}]
    members[WEIGHTS_CONFIG] = json.dumps(config).encode()
    with pytest.raises(KernelRejected, match="needs 4398046511104 bytes, has 0"):
        validate_artifact(plain_zip(members))


# --- 6. the store's files and index ------------------------------------------------------------


def test_store_refuses_symlinks_fifos_and_oversized_objects(tmp_path, norm16):
    artifact, meta = norm16
    store = KernelStore(tmp_path / "store")
    store.put(artifact, meta)
    path = store.path(meta.sha256)
    path.unlink()
    path.symlink_to("/dev/zero")
    with pytest.raises(KernelRejected, match="not a regular file"):
        store.get(meta.sha256)
    path.unlink()
    os.mkfifo(path)
    with pytest.raises(KernelRejected, match="not a regular file"):
        store.get(meta.sha256)  # returns at once: a FIFO is never opened for blocking reads
    path.unlink()
    with open(path, "wb") as f:
        f.truncate(MAX_ARCHIVE_BYTES + 1)
    with pytest.raises(KernelRejected, match=f"at most {MAX_ARCHIVE_BYTES}"):
        store.get(meta.sha256)
    path.unlink()
    assert store.put(artifact, meta) == meta.sha256  # a bad object is rewritten by put
    assert store.get(meta.sha256)[0] == artifact


def test_store_never_writes_through_a_symlinked_shard(tmp_path, norm16):
    artifact, meta = norm16
    outside = tmp_path / "outside"
    outside.mkdir()
    store = KernelStore(tmp_path / "store")
    shard = store.path(meta.sha256).parent
    shard.symlink_to(outside, target_is_directory=True)
    with pytest.raises(KernelRejected, match="must be real directories"):
        store.put(artifact, meta)
    assert list(outside.iterdir()) == []
    (tmp_path / "store2").mkdir()
    (tmp_path / "store2" / "objects").symlink_to(outside, target_is_directory=True)
    with pytest.raises(KernelRejected, match="must be real directories"):
        KernelStore(tmp_path / "store2")


def test_tampered_index_refused(tmp_path, norm16):
    import sqlite3

    artifact, meta = norm16
    other, other_meta = compile_blueprint(BLUEPRINTS["low_rank"](), SHAPE)
    store = KernelStore(tmp_path / "store")
    store.put(artifact, meta)
    store.put(other, other_meta)
    db = sqlite3.connect(tmp_path / "store" / "index.sqlite")
    # Point norm's recipe at the low_rank kernel: a valid kernel, but not the one asked for.
    db.execute(
        "UPDATE recipes SET sha256 = ? WHERE recipe_key = ?", (other_meta.sha256, meta.recipe_key)
    )
    # And give low_rank's row metadata that names another sha.
    db.execute(
        "UPDATE kernels SET meta = ? WHERE sha256 = ?",
        (dataclasses.replace(other_meta, sha256=meta.sha256).to_json(), other_meta.sha256),
    )
    db.execute("UPDATE kernels SET meta = ? WHERE sha256 = ?", ('{"sha256": 1}', meta.sha256))
    db.commit()
    db.close()
    with pytest.raises(KernelRejected, match="points at kernel"):
        store.find(meta.recipe_key)
    with pytest.raises(KernelRejected, match="describes kernel"):
        store.get(other_meta.sha256)
    with pytest.raises(KernelRejected, match="unreadable kernel metadata"):
        store.get(meta.sha256)
    with pytest.raises(KernelRejected, match="param_count='12' is not a"):
        KernelMetadata.from_json(
            meta.to_json().replace(f'"param_count": {meta.param_count}', '"param_count": "12"')
        )


def test_stale_temp_files_swept_fresh_ones_kept(tmp_path, norm16):
    store = KernelStore(tmp_path / "store")
    store.put(*norm16)
    shard = store.path(norm16[1].sha256).parent
    stale, fresh = shard / ".tmp-dead.pt2", shard / ".tmp-busy.pt2"
    stale.write_bytes(b"partial")
    fresh.write_bytes(b"partial")
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    KernelStore(tmp_path / "store")
    assert not stale.exists() and fresh.exists()


# --- end to end ------------------------------------------------------------------------------------


def test_poisoned_store_in_an_episode_is_a_load_fault_and_nothing_runs(tmp_path):
    import gymnasium as gym

    import esper_gym  # noqa: F401  (registers the ids)
    from esper_gym.actions import GERMINATE, Action
    from esper_gym.kernels import load_or_compile, recipe_key

    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"intact")
    env = gym.make("Esper/Spirals-v0", kernel_dir=tmp_path / "store")
    core = env.unwrapped
    obs, _ = env.reset(seed=0)
    layer, name = core.layers[0], "residual_mlp"
    blueprint = core.generator.propose(layer.out_shape, name, core.task.param_budget)
    artifact, meta = compile_blueprint(blueprint, layer.out_shape)
    assert meta.recipe_key == recipe_key(blueprint, layer.out_shape)
    # A shared store whose index maps the genuine recipe to the file-writing artifact.
    evil = file_writer(artifact, victim)
    KernelStore(tmp_path / "store").put(evil, _meta_for(evil, meta))
    action = core.layout.encode(Action(GERMINATE, 0, 0, core.task.blueprints.index(name)))
    assert obs["action_mask"][action]
    _, _, terminated, _, info = env.step(action)
    assert info["fault_kinds"] == ["load"] and not terminated
    assert layer.slots[0].state.name == "DORMANT"
    with pytest.raises(KernelRejected, match="from_file"):  # the reason for that fault
        load_or_compile(blueprint, layer.out_shape, core.store, core.cache)
    for _ in range(3):  # the run goes on, on the host path
        _, _, terminated, _, info = env.step(0)
        assert not terminated and info["val_acc"] > 0
    assert victim.read_bytes() == b"intact"
    assert layer.slots[0].calls == 0


# --- found by a red-team pass: resource bounds and an index that lies ------------------------------


def test_zero_strides_cannot_declare_a_huge_weight_over_a_few_bytes(norm16):
    content = zip_members(norm16[0])
    config = json.loads(content[WEIGHTS_CONFIG])
    entry = next(iter(config["config"].values()))
    content["archive/data/weights/" + entry["path_name"]] = b"\0" * 4
    entry["tensor_meta"]["sizes"] = [{"as_int": 16384}, {"as_int": 16384}]
    entry["tensor_meta"]["strides"] = [{"as_int": 0}, {"as_int": 0}]
    content[WEIGHTS_CONFIG] = json.dumps(config).encode()
    with pytest.raises(KernelRejected, match="needs 1073741824 bytes, has 4"):
        validate_artifact(plain_zip(content))


def _with_doublings(artifact, times):
    """Allowed ops only: cat(h, h) `times` times, then slice back to the slot's width, so the
    output shape is right and every call allocates 2**times the activation."""
    import copy

    content = zip_members(artifact)
    doc = json.loads(content[MODEL_JSON])
    graph = doc["graph_module"]["graph"]
    values = graph["tensor_values"]
    first = graph["nodes"][0]["inputs"][0]["arg"]["as_tensor"]["name"]
    prev, width, new = first, SHAPE[0], []

    for i in range(times):
        out, width = f"dbl{i}", width * 2
        new.append(
            graph_node(
                "torch.ops.aten.cat.default",
                [
                    {"name": "tensors", "arg": {"as_tensors": [{"name": prev}] * 2}, "kind": 1},
                    {"name": "dim", "arg": {"as_int": 1}, "kind": 1},
                ],
                out,
            )
        )
        values[out] = copy.deepcopy(values[first])
        values[out]["sizes"][1] = {"as_int": width}
        values[out]["strides"][0] = {"as_int": width}
        prev = out
    cut = [
        {"name": "self", "arg": {"as_tensor": {"name": prev}}, "kind": 1},
        {"name": "dim", "arg": {"as_int": 1}, "kind": 1},
        {"name": "start", "arg": {"as_int": 0}, "kind": 1},
        {"name": "end", "arg": {"as_int": SHAPE[0]}, "kind": 1},
    ]
    new.append(graph_node("torch.ops.aten.slice.Tensor", cut, "cut"))
    values["cut"] = copy.deepcopy(values[first])
    values["cut"]["strides"][0] = {"as_int": width}
    graph["nodes"][0]["inputs"][0]["arg"]["as_tensor"]["name"] = "cut"
    graph["nodes"][:0] = new
    content[MODEL_JSON] = json.dumps(doc).encode()
    return plain_zip(content)


def test_a_graph_that_allocates_without_bound_is_refused_before_it_runs(tmp_path, norm16):
    artifact, meta = norm16
    harmless = _with_doublings(artifact, 2)  # 4x the activation: a real kernel may do that
    x = torch.randn(3, *SHAPE)
    assert load_artifact(harmless).module()(x).shape == x.shape
    bomb = _with_doublings(artifact, 30)  # 8 GiB per sample
    assert validate_artifact(bomb).output_shape == SHAPE  # statically it looks fine
    with pytest.raises(KernelRejected, match="bytes of intermediates per sample"):
        load_artifact(bomb)
    store = KernelStore(tmp_path / "store")
    store.put(bomb, _meta_for(bomb, meta))
    with pytest.raises(KernelRejected, match="intermediates"):
        KernelCache(store).kernel(hashlib.sha256(bomb).hexdigest(), expected_shape=SHAPE)


def test_graph_size_is_capped(norm16):
    with pytest.raises(KernelRejected, match="nodes"):
        validate_artifact(_with_doublings(norm16[0], 300))


def test_deeply_nested_json_is_refused_not_a_crash(norm16):
    for path in (MODEL_JSON, "archive/data/constants/model_constants_config.json"):
        content = zip_members(norm16[0])
        content[path] = b"[" * 100_000 + b"]" * 100_000
        with pytest.raises(KernelRejected, match=r"malformed content|unreadable"):
            validate_artifact(plain_zip(content))


def test_index_file_must_be_the_stores_own(tmp_path):
    outside = tmp_path / "outside.sqlite"
    root = tmp_path / "store"
    (root / "objects").mkdir(parents=True)
    (root / "index.sqlite").symlink_to(outside)
    with pytest.raises(KernelRejected, match=r"index\.sqlite: not a regular file"):
        KernelStore(root)
    assert not outside.exists()


def test_sql_in_the_index_is_refused(tmp_path):
    import sqlite3

    root = tmp_path / "store"
    (root / "objects").mkdir(parents=True)
    db = sqlite3.connect(root / "index.sqlite")
    db.executescript(
        "CREATE TABLE kernels (sha256 TEXT PRIMARY KEY, meta TEXT NOT NULL);"
        "CREATE VIEW recipes(recipe_key, sha256) AS WITH RECURSIVE c(x) AS "
        "(SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT printf('%d', x), 's' FROM c;"
    )
    db.close()
    with pytest.raises(
        KernelRejected, match=r"unexpected schema objects \[\('view', 'recipes'\)\]"
    ):
        KernelStore(root)  # before: the first find() never returned


def test_an_index_cannot_serve_another_kernel_for_a_recipe(tmp_path):
    from esper_gym.kernels import KernelIncompatible, load_or_compile, recipe_key

    asked = BLUEPRINTS["residual_mlp"]()
    key = recipe_key(asked, SHAPE)
    # A fault kernel filed under the recipe: its index row would switch the shape check off.
    store = KernelStore(tmp_path / "a")
    art, meta = compile_blueprint(BLUEPRINTS["fault_shape"](), SHAPE)
    store.put(art, dataclasses.replace(meta, recipe_key=key))
    with pytest.raises(KernelIncompatible, match=r"returns shape \(17,\)"):
        load_or_compile(asked, SHAPE, store, KernelCache(store))
    # Another template under a row that names the right blueprint.
    store = KernelStore(tmp_path / "b")
    art, meta = compile_blueprint(BLUEPRINTS["low_rank"](), SHAPE)
    store.put(art, dataclasses.replace(meta, recipe_key=key, blueprint=asked.to_dict()))
    with pytest.raises(KernelRejected, match="are not those of residual_mlp"):
        load_or_compile(asked, SHAPE, store, KernelCache(store))
    # A row that admits it is another blueprint.
    store = KernelStore(tmp_path / "c")
    store.put(art, dataclasses.replace(meta, recipe_key=key))
    with pytest.raises(KernelRejected, match="the store serves"):
        load_or_compile(asked, SHAPE, store, KernelCache(store))


def test_a_stale_temp_directory_does_not_stop_the_store(tmp_path, norm16):
    store = KernelStore(tmp_path / "store")
    store.put(*norm16)
    odd = store.path(norm16[1].sha256).parent / ".tmp-dir"
    odd.mkdir()
    old = time.time() - 2 * 3600
    os.utime(odd, (old, old))
    assert len(KernelStore(tmp_path / "store")) == 1 and odd.is_dir()
