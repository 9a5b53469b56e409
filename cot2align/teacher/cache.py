"""The teacher-state cache: the served tensors of every sample, written once, read every later epoch.

What is stored is exactly what travels on the wire in served mode (see
`cot2align.distributed.transport`): per sample and per format (main / aux), the teacher's
hidden states at the RESPONSE positions of the served layers, one record
[n_layers, rows, d] per (sample, format, writer), rows = the sample's teacher response length.

On disk, under one folder::

    key.json                   the CacheKey the folder was started with (a resume must match it)
    part-<writer>.jsonl        one line per COMPLETED shard of that writer: file, bytes, sha256, entries
    shard-<writer>-<n>.bin     flat records; int8 records are followed by their fp32 row scales
    manifest.json              written LAST (atomically), once every required (sample, format, layer)
                               is covered: key, shards with sizes and checksums, the index

A writer that is interrupted loses at most its open shard: on restart it continues after the
shards its journal lists (`CacheWriter.has` says what is already there). A reader refuses a
folder without a manifest, a key that differs (naming the key), and a shard whose size or
checksum differs from the manifest (naming the shard).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from cot2align.configbase import ConfigBase, require

MANIFEST = "manifest.json"
KEY_FILE = "key.json"
FORMAT_VERSION = 1
STORE_DTYPES = ("bfloat16", "float32", "int8")
ITEM_BYTES = {"bfloat16": 2, "float32": 4, "int8": 1}


@dataclass
class TeacherCacheConfig(ConfigBase):
    """The teacher-state cache (`teacher.cache.*`)."""

    mode: Literal["off", "write", "read", "auto"] = "off"
    """off: no cache; write: run the teacher live and write its states; read: read a complete cache
    (no teacher forward, no teacher ranks); auto: read a complete matching cache, else write one."""
    dir: str = ""
    """Cache folder ('' = <run.work_dir>/teacher-cache)."""
    dtype: Literal["bfloat16", "float32", "int8"] = "bfloat16"
    """Storage dtype; int8 stores one fp32 absmax scale per row (per position and layer)."""
    shard_mb: int = 256
    """A shard file is closed (and journaled) once it holds this many MiB."""
    prefetch: int = 4
    """Micro-batches a cached teacher source reads ahead in its background thread."""
    verify: Literal["full", "size"] = "full"
    """full: a reader checks each shard's sha256 the first time it touches it; size: sizes only."""
    batch_size: int = 0
    """cache-teacher: samples per teacher forward (0 = train.micro_batch_size)."""

    def check(self, prefix: str) -> None:
        require(self.shard_mb >= 1, f"{prefix}.shard_mb", f"must be >= 1, got {self.shard_mb}")
        require(self.prefetch >= 1, f"{prefix}.prefetch", f"must be >= 1, got {self.prefetch}")
        require(self.batch_size >= 0, f"{prefix}.batch_size", f"must be >= 0, got {self.batch_size}")


class CacheError(RuntimeError):
    """The cache folder cannot be used: missing manifest, differing key, corrupt or truncated shard."""


@dataclass(frozen=True)
class CacheKey:
    """What determines the cache's content; a reader's key must match the folder's."""

    teacher: str
    """Digest of the teacher's weight and config files."""
    data: str
    """Digest of the training data file (the rationale file when rationales are used)."""
    tokenizer: str
    """Digest of the teacher tokenizer's files."""
    tokenization: str
    """Digest of the data.* settings that change tokenization (lengths, pairing, eos)."""
    layers: tuple[int, ...]
    """Served teacher layers (resolved indices)."""
    formats: tuple[str, ...]
    """Formats stored: ("main",) or ("main", "aux")."""
    dtype: str
    """Storage dtype (bfloat16 | float32 | int8)."""
    teacher_dtype: str
    """The dtype the teacher computed in (weights / autocast)."""
    width: int
    """Teacher hidden size d."""

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "layers": list(self.layers), "formats": list(self.formats)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CacheKey:
        return cls(**{**d, "layers": tuple(d["layers"]), "formats": tuple(d["formats"])})

    def mismatch(self, stored: CacheKey, subset_ok: bool) -> str | None:
        """The first key where `stored` cannot serve this key (None: it can). subset_ok: this key's
        layers and formats may be a subset of the stored ones (reading)."""
        for name in self.__dataclass_fields__:
            mine, theirs = getattr(self, name), getattr(stored, name)
            if subset_ok and name in ("layers", "formats"):
                if not set(mine) <= set(theirs):
                    return f"{name}: this run needs {list(mine)}, the cache holds {list(theirs)}"
            elif mine != theirs:
                return f"{name}: this run has {mine!r}, the cache was written with {theirs!r}"
        return None


def file_digest(paths: Iterable[Path], memo: Path | None = None) -> str:
    """sha256 over the names and contents of `paths` (sorted; folders: their files). memo: a JSON
    file remembering each file's digest by (path, size, mtime), so large weights are read once."""
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"cannot digest {p}: no such file or folder")
    known: dict[str, str] = {}
    if memo is not None and memo.is_file():
        known = json.loads(memo.read_text())
    h = hashlib.sha256()
    changed = False
    for f in sorted(files):
        st = f.stat()
        tag = f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        if tag not in known:
            fh = hashlib.sha256()
            with f.open("rb") as stream:
                for block in iter(lambda: stream.read(1 << 22), b""):
                    fh.update(block)
            known[tag], changed = fh.hexdigest(), True
        h.update(f.name.encode() + b"\0" + known[tag].encode())
    if memo is not None and changed:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known))
        tmp.replace(memo)
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- encoding
def encode(states: Tensor, dtype: str) -> bytes:
    """[n_layers, rows, d] float -> record bytes in the storage dtype (int8: values, then fp32 scales
    [n_layers, rows])."""
    x = states.detach().to("cpu", torch.float32).contiguous()
    if dtype == "float32":
        return x.numpy().tobytes()
    if dtype == "bfloat16":
        return x.to(torch.bfloat16).view(torch.int16).numpy().tobytes()
    scale = x.abs().amax(dim=-1).clamp_min(1e-12) / 127.0  # [n_layers, rows]
    q = torch.round(x / scale.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    return q.numpy().tobytes() + scale.numpy().tobytes()


def decode(buf: np.ndarray, n_layers: int, rows: int, width: int, dtype: str) -> Tensor:
    """Record bytes (uint8 array) -> [n_layers, rows, d] float32 (bf16 and int8 widened exactly)."""
    n = n_layers * rows * width
    if dtype == "float32":
        return torch.from_numpy(np.frombuffer(buf, dtype=np.float32, count=n).copy()).view(n_layers, rows, width)
    if dtype == "bfloat16":
        raw = torch.from_numpy(np.frombuffer(buf, dtype=np.int16, count=n).copy())
        return raw.view(torch.bfloat16).float().view(n_layers, rows, width)
    q = torch.from_numpy(np.frombuffer(buf, dtype=np.int8, count=n).copy()).view(n_layers, rows, width)
    scale = torch.from_numpy(np.frombuffer(buf, dtype=np.float32, count=n_layers * rows, offset=n).copy())
    return q.float() * scale.view(n_layers, rows, 1)


def record_bytes(n_layers: int, rows: int, width: int, dtype: str) -> int:
    """Bytes of one record on disk."""
    return n_layers * rows * (width * ITEM_BYTES[dtype] + (4 if dtype == "int8" else 0))


# --------------------------------------------------------------------------- writing
Entry = tuple[int, str, tuple[int, ...], int, int]
"""(sample, format, layers, byte offset, rows) of one record inside a shard."""


@dataclass
class _Shard:
    name: str
    entries: list[Entry] = field(default_factory=list)
    size: int = 0
    sha: Any = field(default_factory=hashlib.sha256)


def _journal(root: Path) -> list[dict[str, Any]]:
    """Every completed shard of every writer (parts in name order)."""
    out = []
    for part in sorted(root.glob("part-*.jsonl")):
        for n, line in enumerate(part.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                if n == len(part.read_text().splitlines()):  # a torn last line: that shard is redone
                    break
                raise CacheError(f"{part}:{n}: not a JSON journal line") from None
    return out


def _check_key(root: Path, key: CacheKey, part: str) -> None:
    """Start the folder with `key` (writer `part`), or check that it was started with the same key.
    Concurrent writers may start it together: the first key linked in stays, the others are checked."""
    path = root / KEY_FILE
    if not path.is_file():
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f"key.{part}.tmp"
        tmp.write_text(json.dumps(key.to_json(), indent=1))
        try:
            os.link(tmp, path)  # create-if-absent, atomically and whole
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    stored = CacheKey.from_json(json.loads(path.read_text()))
    why = key.mismatch(stored, subset_ok=False)
    if why:
        raise CacheError(f"teacher cache {root} holds other teacher states (key {why}); point "
                         "teacher.cache.dir elsewhere or delete the folder")


class CacheWriter:
    """Appends records of one writer (`part`: a name unique among concurrent writers) to shard files.

    add() records are buffered in the open shard; a shard is journaled (part-<name>.jsonl) when it
    reaches `shard_bytes` and on close(). What completed shards of ANY writer hold is `has()`.
    """

    def __init__(self, root: str | Path, key: CacheKey, part: str, shard_bytes: int = 256 << 20) -> None:
        self.root = Path(root)
        self.key = key
        self.part = part
        self.shard_bytes = shard_bytes
        _check_key(self.root, key, part)
        self._repair()
        self._have: set[tuple[int, str, int]] = {
            (e[0], e[1], layer) for s in _journal(self.root) for e in s["entries"] for layer in e[2]}
        self._next = sum(1 for _ in self._part_path().open()) if self._part_path().is_file() else 0
        self._shard: _Shard | None = None
        self._stream: Any = None
        self.bytes_written = 0

    def _part_path(self) -> Path:
        return self.root / f"part-{self.part}.jsonl"

    def _repair(self) -> None:
        """Drop a torn last line of this writer's journal (killed while journaling that shard)."""
        path = self._part_path()
        if not path.is_file():
            return
        lines = path.read_text().splitlines()
        if lines and not path.read_text().endswith("\n"):
            path.write_text("".join(line + "\n" for line in lines[:-1]))

    def has(self, sample: int, fmt: str, layers: Sequence[int]) -> bool:
        """Every one of `layers` of (sample, fmt) is in a completed shard (or this writer's open one)."""
        return all((sample, fmt, layer) in self._have for layer in layers)

    def add(self, sample: int, fmt: str, layers: Sequence[int], states: Tensor) -> None:
        """Store one record: states [len(layers), rows, d] of `sample`'s `fmt` response positions."""
        if states.shape[0] != len(layers) or states.shape[-1] != self.key.width:
            raise ValueError(f"record of sample {sample} ({fmt}) has shape {list(states.shape)}, expected "
                             f"[{len(layers)}, rows, {self.key.width}]")
        if self.has(sample, fmt, layers):
            return
        if self._shard is None:
            name = f"shard-{self.part}-{self._next:05d}.bin"
            self._shard = _Shard(name)
            self._stream = (self.root / name).open("wb")  # a torn earlier attempt is overwritten
        blob = encode(states, self.key.dtype)
        shard = self._shard
        shard.entries.append((sample, fmt, tuple(layers), shard.size, int(states.shape[1])))
        self._stream.write(blob)
        shard.sha.update(blob)
        shard.size += len(blob)
        self.bytes_written += len(blob)
        self._have.update((sample, fmt, layer) for layer in layers)
        if shard.size >= self.shard_bytes:
            self._seal()

    def _seal(self) -> None:
        shard, self._shard = self._shard, None
        if shard is None:
            return
        self._stream.flush()
        os.fsync(self._stream.fileno())
        self._stream.close()
        line = {"file": shard.name, "bytes": shard.size, "sha256": shard.sha.hexdigest(),
                "entries": [[s, f, list(ls), off, rows] for s, f, ls, off, rows in shard.entries]}
        with self._part_path().open("a") as j:
            j.write(json.dumps(line) + "\n")
            j.flush()
            os.fsync(j.fileno())
        self._next += 1

    def close(self) -> None:
        """Journal the open shard."""
        self._seal()


def required_entries(paired: Sequence[bool], formats: Sequence[str]) -> set[tuple[int, str]]:
    """(sample, format) pairs a complete cache holds: main of every sample, aux of paired ones."""
    out = {(i, "main") for i in range(len(paired))}
    if "aux" in formats:
        out |= {(i, "aux") for i, p in enumerate(paired) if p}
    return out


def missing(root: str | Path, key: CacheKey, required: set[tuple[int, str]]) -> set[tuple[int, str]]:
    """Required (sample, format) pairs that completed shards do not fully cover (every layer)."""
    have: dict[tuple[int, str], set[int]] = {}
    for s in _journal(Path(root)):
        for e in s["entries"]:
            have.setdefault((e[0], e[1]), set()).update(e[2])
    want = set(key.layers)
    return {r for r in required if not want <= have.get(r, set())}


def finalize(root: str | Path, key: CacheKey, required: set[tuple[int, str]]) -> bool:
    """Write the manifest (last, atomically) when the journaled shards cover `required` for every
    layer of `key`; returns whether the cache is complete. Safe to call from every writer."""
    root = Path(root)
    if (root / MANIFEST).is_file():
        return True
    if missing(root, key, required):
        return False
    shards, index = [], []
    seen: set[tuple[int, str, int]] = set()
    for s in _journal(root):
        used = []
        for sample, fmt, layers, off, rows in s["entries"]:
            new = [layer for layer in layers if (sample, fmt, layer) not in seen]
            if not new or (sample, fmt) not in required:
                continue
            seen.update((sample, fmt, layer) for layer in layers)
            used.append([sample, fmt, layers, off, rows])
        if used:
            index.append(used)
            shards.append({"file": s["file"], "bytes": s["bytes"], "sha256": s["sha256"]})
    manifest = {"version": FORMAT_VERSION, "key": key.to_json(), "shards": shards, "index": index}
    tmp = root / f"{MANIFEST}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(manifest))
    tmp.replace(root / MANIFEST)
    return True


# --------------------------------------------------------------------------- reading
def is_complete(root: str | Path) -> bool:
    return (Path(root) / MANIFEST).is_file()


def wait_complete(root: str | Path, timeout_s: float, after: str, poll_s: float = 0.2) -> None:
    """Block until another process seals the cache at `root` (writes its manifest), at most
    `timeout_s` seconds; a `CacheError` naming the folder when it does not. after: what the seal
    was expected after (for the message)."""
    deadline = time.monotonic() + timeout_s
    while not is_complete(root):
        if time.monotonic() > deadline:
            raise CacheError(f"teacher cache {root} is still not sealed (no {MANIFEST}) {timeout_s:.0f} s after "
                             f"{after}; it cannot be read (runtime.timeout_s bounds this wait)")
        time.sleep(poll_s)


def stored_key(root: str | Path) -> CacheKey | None:
    """The key of the folder (manifest, else key.json of an unfinished write), or None."""
    root = Path(root)
    for name in (MANIFEST, KEY_FILE):
        if (root / name).is_file():
            d = json.loads((root / name).read_text())
            return CacheKey.from_json(d["key"] if name == MANIFEST else d)
    return None


class CacheReader:
    """Memory-maps a complete cache and reads records by (sample, format); thread-safe for one reader
    thread. Refuses a folder without manifest, another key, a shard of the wrong size or checksum."""

    def __init__(self, root: str | Path, key: CacheKey, verify: str = "full") -> None:
        self.root = Path(root)
        path = self.root / MANIFEST
        if not path.is_file():
            what = "an unfinished write (no manifest.json yet)" if (self.root / KEY_FILE).is_file() else "no cache"
            raise CacheError(f"teacher cache {self.root}: {what}; write it first (teacher.cache.mode=write or "
                             "auto, or `cot2align cache-teacher`)")
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise CacheError(f"{path}: corrupt manifest ({e})") from None
        stored = CacheKey.from_json(manifest["key"])
        why = key.mismatch(stored, subset_ok=True)
        if why:
            raise CacheError(f"teacher cache {self.root} does not match this run (key {why}); point "
                             "teacher.cache.dir elsewhere, or rewrite it (teacher.cache.mode=write into an empty folder)")
        self.key, self.stored = key, stored
        self.verify = verify
        self.shards: list[dict[str, Any]] = manifest["shards"]
        self._index: dict[tuple[int, str], list[tuple[int, tuple[int, ...], int, int]]] = {}
        for shard_id, entries in enumerate(manifest["index"]):
            for sample, fmt, layers, off, rows in entries:
                self._index.setdefault((sample, fmt), []).append((shard_id, tuple(layers), off, rows))
        for s in self.shards:
            f = self.root / s["file"]
            size = f.stat().st_size if f.is_file() else -1
            if size != s["bytes"]:
                raise CacheError(f"teacher cache shard {f} is {'missing' if size < 0 else f'{size} bytes'}, the "
                                 f"manifest says {s['bytes']} bytes (truncated or replaced): rewrite the cache")
        self._maps: dict[int, np.ndarray] = {}

    def _map(self, shard_id: int) -> np.ndarray:
        if shard_id not in self._maps:
            s = self.shards[shard_id]
            f = self.root / s["file"]
            mm = np.memmap(f, dtype=np.uint8, mode="r") if s["bytes"] else np.zeros(0, np.uint8)
            if self.verify == "full":
                sha = hashlib.sha256()
                for start in range(0, len(mm), 1 << 24):
                    sha.update(mm[start : start + (1 << 24)].tobytes())
                if sha.hexdigest() != s["sha256"]:
                    raise CacheError(f"teacher cache shard {f} is corrupt (sha256 {sha.hexdigest()[:16]}..., the "
                                     f"manifest says {s['sha256'][:16]}...): rewrite the cache")
            self._maps[shard_id] = mm
        return self._maps[shard_id]

    def has(self, sample: int, fmt: str) -> bool:
        return (sample, fmt) in self._index

    def read(self, sample: int, fmt: str, layers: Sequence[int]) -> Tensor:
        """[len(layers), rows, d] float32 states of (sample, fmt) in the order of `layers`."""
        recs = self._index.get((sample, fmt))
        if not recs:
            raise CacheError(f"teacher cache {self.root} has no {fmt} states of sample {sample}")
        got: dict[int, Tensor] = {}
        for shard_id, rec_layers, off, rows in recs:
            need = [x for x in rec_layers if x in layers and x not in got]
            if not need:
                continue
            size = record_bytes(len(rec_layers), rows, self.stored.width, self.stored.dtype)
            buf = self._map(shard_id)[off : off + size]
            states = decode(np.asarray(buf), len(rec_layers), rows, self.stored.width, self.stored.dtype)
            for i, layer in enumerate(rec_layers):
                if layer in need:
                    got[layer] = states[i]
        absent = [x for x in layers if x not in got]
        if absent:
            raise CacheError(f"teacher cache {self.root}: sample {sample} ({fmt}) lacks layers {absent}")
        return torch.stack([got[x] for x in layers])
