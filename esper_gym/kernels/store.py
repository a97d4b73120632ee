"""KernelStore: content-addressed kernel artifacts on disk plus a SQLite index.

Layout under `root`:
    objects/<sha[:2]>/<sha>.pt2   artifact bytes, named by their sha256
    index.sqlite                  sha256 -> metadata JSON, recipe_key -> sha256 (WAL mode), and
                                  `outcomes`: what each seed grown from a kernel achieved
                                  (`record_outcome` / `outcomes`, the history Karn learns from)

Several processes (the workers of a vector env) may share one root. Files are written to a
temp file, fsynced and os.replace'd into place, so a reader never sees a partial artifact; index
rows are written after the file with INSERT OR IGNORE, so two writers of the same kernel agree
(content addressing makes their bytes identical) and a row always points at a complete file.

A store may be shared or downloaded, so its contents are untrusted: objects are read only when
they are regular files (no symlink, FIFO or device) under real directories of the root, at most
MAX_ARCHIVE_BYTES; index rows must agree with each other and with the file's sha256; temp files
left by killed writers are swept when the store is opened. Outcome rows are plain columns and
JSON text: each is type- and range-checked when read and a malformed one is skipped (counted in
`outcomes(...).skipped`), never evaluated or unpickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import sqlite3
import stat
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from esper_gym.kernels.archive import MAX_ARCHIVE_BYTES
from esper_gym.kernels.blueprints import blueprint_from_dict
from esper_gym.kernels.validator import KernelMetadata, KernelRejected

_SHA256 = re.compile(r"[0-9a-f]{64}")
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS kernels (sha256 TEXT PRIMARY KEY, meta TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS recipes (recipe_key TEXT PRIMARY KEY, sha256 TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS outcomes (id INTEGER PRIMARY KEY, task TEXT, kind TEXT, "
    "blueprint TEXT, shape TEXT, features TEXT, contribution REAL, params INTEGER, "
    "host_params INTEGER, fate TEXT, age INTEGER)",
)
FATES = ("fossilized", "culled", "live")  # "live": still running when its episode ended
# Bounds of a readable outcome row: a hostile store must not make Karn allocate or fit junk.
_MAX_JSON = 4096
_MAX_FEATURES = 64
# Node features are health signals and progress: bounded, so Karn's least squares stay finite.
_MAX_FEATURE = 1e6


@dataclass(frozen=True)
class SeedOutcome:
    """What one seed achieved: its blueprint (kind and hyper-parameters, `Blueprint.to_dict`),
    its slot's shape, its node's features when it germinated, its last measured contribution
    (validation accuracy with it on minus off, 0..1 scale), its parameter count, the host's, how
    it ended (FATES) and how many optimizer steps it lived."""

    task: str
    kind: str
    blueprint: dict[str, Any]
    shape: tuple[int, ...]
    features: dict[str, float]
    contribution: float
    params: int
    host_params: int
    fate: str
    age: int

    def __post_init__(self) -> None:
        problem = _outcome_problem(self)
        if problem is not None:
            raise ValueError(f"bad seed outcome: {problem}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _outcome_problem(o: SeedOutcome) -> str | None:
    if not isinstance(o.task, str) or not isinstance(o.kind, str) or not o.kind:
        return f"task {str(o.task)[:80]!r} and kind {str(o.kind)[:80]!r} must be strings"
    if len(o.task) > 200:
        return f"task {o.task[:80]!r}... is longer than 200 characters"
    if not isinstance(o.blueprint, dict) or o.blueprint.get("name") != o.kind:
        return f"blueprint {str(o.blueprint)[:200]} must be a dict named {o.kind[:80]!r}"
    # The registry is the schema: a row names a registered blueprint whose fields build it with
    # their declared types and ranges (Karn takes logs of init_scale and reads every size).
    try:
        if blueprint_from_dict(o.blueprint).to_dict() != o.blueprint:
            return f"blueprint {str(o.blueprint)[:200]} is not in its registered form"
    except (ValueError, TypeError) as exc:
        return f"blueprint {str(o.blueprint)[:200]}: {exc}"
    if not (isinstance(o.shape, tuple) and 1 <= len(o.shape) <= 3):
        return f"shape {o.shape!r} must be a tuple of 1 to 3 sizes"
    if not all(_is_int(s) and 0 < s <= 1 << 20 for s in o.shape):
        return f"shape {o.shape!r} must hold sizes in 1..2**20"
    if not isinstance(o.features, dict) or len(o.features) > _MAX_FEATURES:
        return f"features must be a dict of at most {_MAX_FEATURES} numbers"
    if not all(
        isinstance(k, str) and len(k) <= 64 and _is_num(v) and abs(v) <= _MAX_FEATURE
        for k, v in o.features.items()
    ):
        return f"features must map names (<= 64 characters) to numbers in +-{_MAX_FEATURE:g}"
    if not _is_num(o.contribution) or not -1.0 <= o.contribution <= 1.0:
        return f"contribution {o.contribution!r} must be a finite number in [-1, 1]"
    if not (_is_int(o.params) and 0 <= o.params < 1 << 40):
        return f"params {o.params!r} must be an integer >= 0"
    if not (_is_int(o.host_params) and 0 < o.host_params < 1 << 40):
        return f"host_params {o.host_params!r} must be an integer > 0"
    if o.fate not in FATES:
        return f"fate {o.fate!r}; allowed: {', '.join(FATES)}"
    if not (_is_int(o.age) and 0 <= o.age < 1 << 40):
        return f"age {o.age!r} must be an integer >= 0"
    return None


def _json_field(text: Any, name: str) -> Any:
    if not isinstance(text, str) or len(text) > _MAX_JSON:
        raise ValueError(f"{name} must be JSON text of at most {_MAX_JSON} characters")
    # json.loads only builds dicts, lists, strings and numbers; constants like NaN are refused.
    return json.loads(text, parse_constant=lambda c: _raise(f"{name}: {c} is not allowed"))


def _raise(message: str):
    raise ValueError(message)


def outcome_from_row(row: tuple) -> SeedOutcome:
    """A SeedOutcome from an `outcomes` row (without its id); ValueError naming what is wrong."""
    if len(row) != 10:
        raise ValueError(f"an outcome row has 10 columns, this one {len(row)}")
    task, kind, blueprint, shape, features, contribution, params, host_params, fate, age = row
    shape = _json_field(shape, "shape")
    if not isinstance(shape, list):
        raise ValueError(f"shape {shape!r} must be a list")
    return SeedOutcome(
        task=task,
        kind=kind,
        blueprint=_json_field(blueprint, "blueprint"),
        shape=tuple(shape),
        features=_json_field(features, "features"),
        contribution=contribution,
        params=params,
        host_params=host_params,
        fate=fate,
        age=age,
    )


# Metadata is a flat object of a dozen fields; a row far larger (or nested deeper than its
# blueprint) is hostile: json's recursion would raise RecursionError 200k levels down.
_MAX_META = 16384


def _metadata(text: Any, where: str) -> KernelMetadata:
    """A metadata row parsed and checked: sizes bounded, its blueprint registered (KernelRejected
    naming `where` otherwise)."""
    if not isinstance(text, str) or len(text) > _MAX_META:
        raise KernelRejected(f"{where}: metadata must be JSON text of at most {_MAX_META} bytes")
    try:
        meta = KernelMetadata.from_json(text)
    except RecursionError:
        raise KernelRejected(f"{where}: metadata nested too deeply") from None
    except KernelRejected as exc:
        raise KernelRejected(f"{where}: {exc}") from None
    try:
        if blueprint_from_dict(meta.blueprint).to_dict() != meta.blueprint:
            raise ValueError("not in its registered form")
    except (ValueError, TypeError) as exc:
        raise KernelRejected(f"{where}: metadata blueprint: {str(exc)[:200]}") from None
    return meta


class Outcomes(list):
    """The readable outcome rows, oldest first; `skipped`: how many rows were malformed,
    `problems`: the first few reasons."""

    def __init__(self) -> None:
        super().__init__()
        self.skipped = 0
        self.problems: list[str] = []


# A writer's temp file older than this was left by a killed process (a write takes ms).
STALE_TMP_S = 3600.0


def _read_regular(path: Path) -> bytes:
    """The bytes of `path` if it is a regular file of at most MAX_ARCHIVE_BYTES, not a symlink.

    FileNotFoundError if absent; KernelRejected otherwise. O_NONBLOCK: opening a FIFO must not
    hang; O_NOFOLLOW: a symlink (to /dev/zero, or out of the store) is refused, not followed.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise KernelRejected(f"{path}: not a regular file ({e.strerror})") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):  # checked on the fd: a directory opens, then fails reads
        os.close(fd)
        raise KernelRejected(f"{path}: not a regular file")
    with os.fdopen(fd, "rb") as f:
        if info.st_size > MAX_ARCHIVE_BYTES:
            raise KernelRejected(f"{path}: {info.st_size} bytes, at most {MAX_ARCHIVE_BYTES}")
        data = f.read(MAX_ARCHIVE_BYTES + 1)
    if len(data) > MAX_ARCHIVE_BYTES:
        raise KernelRejected(f"{path}: grew past {MAX_ARCHIVE_BYTES} bytes while read")
    return data


def _holds(path: Path, sha: str) -> bool:
    try:
        return hashlib.sha256(_read_regular(path)).hexdigest() == sha
    except (FileNotFoundError, KernelRejected):
        return False


class KernelStore:
    """Artifacts by sha256 on disk, metadata in SQLite; survives restarts, safe across processes."""

    def __init__(self, root: str | os.PathLike, busy_timeout_s: float = 30.0):
        self.root = Path(root)
        self.busy_timeout_s = busy_timeout_s
        (self.root / "objects").mkdir(parents=True, exist_ok=True)
        self._real_dir(self.root / "objects")
        self._sweep_tmp()
        self._use_wal()
        with self._db() as db:
            for statement in _SCHEMA:
                db.execute(statement)
            # The index file is the store's too: a view or trigger in it would be SQL of the
            # store author's that runs in every query (an endless recursive view hangs `find`).
            schema = db.execute("SELECT type, name, sql FROM sqlite_master").fetchall()
            expected = {("table", s.split()[5], s.replace(" IF NOT EXISTS", "")) for s in _SCHEMA}
            extra = [
                (kind, name)
                for kind, name, sql in schema
                if (kind, name, sql) not in expected
                and not (kind == "index" and sql is None and name.startswith("sqlite_autoindex_"))
            ]
            if extra:
                raise KernelRejected(
                    f"store index at {self.root}: unexpected schema objects {extra}"
                )

    def _use_wal(self) -> None:
        # WAL lets readers proceed while a writer commits; the setting persists in the file.
        # Two processes switching a fresh index to WAL at once deadlock on the lock upgrade, and
        # SQLite answers one of them SQLITE_BUSY at once, without its busy handler: retry that.
        deadline = time.monotonic() + self.busy_timeout_s
        delay = 0.002
        while True:
            try:
                with self._db() as db:
                    if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                        db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as err:
                if "locked" not in str(err) or time.monotonic() > deadline:
                    raise
                time.sleep(delay)
                delay = min(2 * delay, 0.1)

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        # One short-lived connection per call: a store object is pickled into spawned workers
        # and used from any thread, and a connection must never be shared across either.
        # Opening one costs ~0.1 ms, nothing next to loading a kernel.
        index = self.root / "index.sqlite"
        for path in (
            index,
            *(index.with_name(index.name + x) for x in ("-wal", "-shm", "-journal")),
        ):
            # sqlite follows symlinks: the index (or its side files) must be the store's own.
            with contextlib.suppress(FileNotFoundError):
                if not stat.S_ISREG(path.lstat().st_mode):
                    raise KernelRejected(f"{path}: not a regular file")
        db = sqlite3.connect(index, timeout=self.busy_timeout_s)
        db.execute("PRAGMA trusted_schema=OFF")
        try:
            with db:  # commit on success, roll back on error
                yield db
        finally:
            db.close()

    def _real_dir(self, path: Path) -> Path:
        # A symlinked objects/ or shard directory would put reads and writes outside the store.
        if path.is_symlink() or not path.is_dir():
            raise KernelRejected(f"{path}: store directories must be real directories")
        return path

    def _sweep_tmp(self) -> None:
        now = time.time()
        for shard in (self.root / "objects").iterdir():
            if shard.is_symlink() or not shard.is_dir():
                continue
            for tmp in shard.glob(".tmp-*"):
                with contextlib.suppress(FileNotFoundError):
                    info = tmp.lstat()
                    if stat.S_ISREG(info.st_mode) and now - info.st_mtime > STALE_TMP_S:
                        tmp.unlink()

    def path(self, sha: str) -> Path:
        """Where the artifact `sha` lives (whether or not it exists)."""
        if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
            raise ValueError(f"not a sha256 hex digest: {sha!r}")
        return self.root / "objects" / sha[:2] / f"{sha}.pt2"

    def put(self, artifact: bytes, meta: KernelMetadata) -> str:
        """Store `artifact` under its sha256 and index `meta`; returns the sha. Idempotent; a
        file found corrupt on disk is rewritten. The first metadata indexed for a sha is kept.

        KernelRejected if the bytes do not hash to `meta.sha256`.
        """
        digest = hashlib.sha256(artifact).hexdigest()
        if digest != meta.sha256:
            raise KernelRejected(f"artifact sha256 {digest} does not match metadata {meta.sha256}")
        path = self.path(digest)
        if not _holds(path, digest):  # absent, or corrupt on disk: (re)write it
            path.parent.mkdir(parents=True, exist_ok=True)
            self._real_dir(path.parent)
            if path.is_symlink():
                path.unlink()  # os.replace swaps the link itself, but say so plainly
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".pt2")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(artifact)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)  # make the rename itself durable
            finally:
                os.close(dir_fd)
        with self._db() as db:
            db.execute("INSERT OR IGNORE INTO kernels VALUES (?, ?)", (digest, meta.to_json()))
            db.execute("INSERT OR IGNORE INTO recipes VALUES (?, ?)", (meta.recipe_key, digest))
        return digest

    def meta(self, sha: str) -> KernelMetadata:
        """The indexed metadata of `sha`; KeyError if it is not in the store."""
        self.path(sha)  # validates the digest
        with self._db() as db:
            row = db.execute("SELECT meta FROM kernels WHERE sha256 = ?", (sha,)).fetchone()
        if row is None:
            raise KeyError(f"kernel {sha} is not in the store at {self.root}")
        return _metadata(row[0], f"kernel {sha}")

    def get(self, sha: str) -> tuple[bytes, KernelMetadata]:
        """The artifact bytes and metadata of `sha`, checksum re-verified on every read.

        KeyError if `sha` is not indexed; KernelRejected naming the sha and path if the file is
        missing or its bytes no longer hash to `sha` (corruption on disk).
        """
        meta = self.meta(sha)
        if meta.sha256 != sha:
            raise KernelRejected(f"kernel {sha}: its index row describes kernel {meta.sha256}")
        path = self.path(sha)
        try:
            self._real_dir(path.parent)
            artifact = _read_regular(path)
        except FileNotFoundError:
            raise KernelRejected(f"kernel {sha}: indexed but its file {path} is missing") from None
        digest = hashlib.sha256(artifact).hexdigest()
        if digest != sha:
            raise KernelRejected(f"kernel {sha}: file {path} is corrupt (its sha256 is {digest})")
        return artifact, meta

    def find(self, recipe_key: str) -> KernelMetadata | None:
        """Metadata of the artifact compiled from `recipe_key`, or None if there is none.

        KernelRejected if the index disagrees with itself: a recipe row pointing at a kernel
        whose metadata names another sha. The metadata may name another recipe: content
        addressing gives one row to identical bytes, and two recipes (other numerics, say) can
        compile to the same bytes; the first recipe's metadata is kept. That the kernel is the
        recipe's blueprint and shape is the caller's check (`kernels.library.load_or_compile`),
        so a tampered row can serve no other template or size.
        """
        with self._db() as db:
            row = db.execute(
                "SELECT r.sha256, k.meta FROM recipes r JOIN kernels k ON k.sha256 = r.sha256 "
                "WHERE r.recipe_key = ?",
                (recipe_key,),
            ).fetchone()
        if row is None:
            return None
        meta = _metadata(row[1], f"recipe {recipe_key}")
        if meta.sha256 != row[0]:
            raise KernelRejected(
                f"store index at {self.root}: recipe {recipe_key} points at kernel {row[0]}, "
                f"whose metadata is for kernel {meta.sha256}, recipe {meta.recipe_key}"
            )
        return meta

    def record_outcome(self, outcome: SeedOutcome) -> None:
        """Append one seed's outcome to the history (any process may write concurrently)."""
        self.record_outcomes([outcome])

    def record_outcomes(self, outcomes: Sequence[SeedOutcome]) -> None:
        """Append outcomes in one transaction: a commit costs milliseconds, a row nothing
        (the batched simulator writes a whole step's outcomes at once)."""
        if not outcomes:
            return
        rows = [
            (
                o.task,
                o.kind,
                json.dumps(o.blueprint, sort_keys=True),
                json.dumps(list(o.shape)),
                json.dumps(o.features, sort_keys=True),
                float(o.contribution),
                int(o.params),
                int(o.host_params),
                o.fate,
                int(o.age),
            )
            for o in outcomes
        ]
        with self._db() as db:
            db.executemany(
                "INSERT INTO outcomes (task, kind, blueprint, shape, features, contribution, "
                "params, host_params, fate, age) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )

    def outcomes(self, kind: str | None = None, limit: int | None = None) -> Outcomes:
        """The recorded outcomes (of blueprint `kind`, or all), oldest first; at most the
        `limit` newest. A row that fails its checks is skipped and counted, never trusted."""
        query = (
            "SELECT task, kind, blueprint, shape, features, contribution, params, host_params, "
            "fate, age FROM outcomes"
        )
        args: tuple = ()
        if kind is not None:
            query, args = query + " WHERE kind = ?", (kind,)
        query += " ORDER BY id DESC"
        if limit is not None:
            query += f" LIMIT {int(limit)}"
        with self._db() as db:
            rows = db.execute(query, args).fetchall()
        result = Outcomes()
        for row in reversed(rows):
            try:
                result.append(outcome_from_row(row))
            except (ValueError, TypeError, RecursionError) as exc:
                result.skipped += 1
                if len(result.problems) < 10:
                    result.problems.append(str(exc)[:200])
        return result

    def shas(self) -> list[str]:
        with self._db() as db:
            return [row[0] for row in db.execute("SELECT sha256 FROM kernels ORDER BY sha256")]

    def __contains__(self, sha: object) -> bool:
        if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
            return False
        with self._db() as db:
            row = db.execute("SELECT 1 FROM kernels WHERE sha256 = ?", (sha,)).fetchone()
        return row is not None

    def __len__(self) -> int:
        with self._db() as db:
            return db.execute("SELECT COUNT(*) FROM kernels").fetchone()[0]

    def __repr__(self) -> str:
        return f"KernelStore({str(self.root)!r})"
