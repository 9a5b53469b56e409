"""The teacher-state cache format: round trips, key mismatch, corrupt / truncated shards, resume."""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from cot2align.teacher.cache import (
    MANIFEST,
    CacheError,
    CacheKey,
    CacheReader,
    CacheWriter,
    decode,
    encode,
    file_digest,
    finalize,
    missing,
    required_entries,
)

WIDTH = 8
LAYERS = (0, 3)


def _key(dtype: str = "float32", **changes: object) -> CacheKey:
    key = CacheKey(teacher="t1", data="d1", tokenizer="k1", tokenization="x", layers=LAYERS, formats=("main", "aux"),
                   dtype=dtype, teacher_dtype="float32", width=WIDTH)
    return dataclasses.replace(key, **changes)  # type: ignore[arg-type]


def _states(n: int) -> dict[tuple[int, str], torch.Tensor]:
    """Deterministic records: sample i has 2 + i % 5 main rows; odd samples are paired (aux rows)."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for i in range(n):
        out[(i, "main")] = torch.randn(len(LAYERS), 2 + i % 5, WIDTH, generator=g) * (i + 1)
        if i % 2:
            out[(i, "aux")] = torch.randn(len(LAYERS), 1 + i % 3, WIDTH, generator=g)
    return out


def _paired(n: int) -> list[bool]:
    return [bool(i % 2) for i in range(n)]


def _write_all(root: Path, states: dict[tuple[int, str], torch.Tensor], key: CacheKey, shard_bytes: int = 1 << 20
               ) -> None:
    w = CacheWriter(root, key, "a", shard_bytes)
    for (i, fmt), x in states.items():
        w.add(i, fmt, list(LAYERS), x)
    w.close()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_encode_decode_round_trip(dtype: str) -> None:
    """fp32 exact; bf16 == torch's bf16 rounding; int8 within half a step of each row's absmax / 127."""
    x = torch.randn(2, 7, WIDTH) * torch.arange(1, 8).view(1, 7, 1)
    y = decode(np.frombuffer(encode(x, dtype), dtype=np.uint8), 2, 7, WIDTH, dtype)
    if dtype == "float32":
        assert torch.equal(y, x)
    elif dtype == "bfloat16":
        assert torch.equal(y, x.to(torch.bfloat16).float())
    else:
        step = x.abs().amax(dim=-1, keepdim=True) / 127
        assert ((y - x).abs() <= step / 2 + 1e-6).all()
        assert not torch.equal(y, x)


def test_write_finalize_read(tmp_path: Path) -> None:
    """Records come back exactly (fp32), in the requested layer order, also a layer subset; the
    manifest appears only once every required (sample, format) is written."""
    states = _states(12)
    key = _key()
    required = required_entries(_paired(12), key.formats)
    assert required == set(states)
    w = CacheWriter(tmp_path, key, "a", 300)  # several shards
    items = list(states.items())
    for (i, fmt), x in items[:-1]:
        w.add(i, fmt, list(LAYERS), x)
    w.close()
    assert not finalize(tmp_path, key, required) and not (tmp_path / MANIFEST).exists()
    with pytest.raises(CacheError, match="unfinished write"):
        CacheReader(tmp_path, key)
    (i, fmt), x = items[-1]
    w = CacheWriter(tmp_path, key, "b", 300)
    w.add(i, fmt, list(LAYERS), x)
    w.close()
    assert finalize(tmp_path, key, required)
    r = CacheReader(tmp_path, dataclasses.replace(key, layers=(3,), formats=("main",)))
    assert len(r.shards) > 2
    for (i, fmt), x in states.items():
        assert torch.equal(r.read(i, fmt, [3, 0]), torch.stack([x[1], x[0]]))
        assert torch.equal(r.read(i, fmt, [3]), x[1:])


@pytest.mark.parametrize("field,value", [("data", "d2"), ("teacher", "t2"), ("dtype", "bfloat16"),
                                         ("layers", (0, 3, 5)), ("width", 16)])
def test_key_mismatch_is_refused_naming_the_key(tmp_path: Path, field: str, value: object) -> None:
    _write_all(tmp_path, _states(4), _key())
    assert finalize(tmp_path, _key(), required_entries(_paired(4), ("main", "aux")))
    with pytest.raises(CacheError, match=f"key {field}:"):
        CacheReader(tmp_path, _key(**{field: value}))
    with pytest.raises(CacheError, match=f"key {field}:"):  # a writer too: no mixing of two teachers
        CacheWriter(tmp_path, _key(**{field: value}), "c")


def test_writers_starting_one_folder_together_agree_on_its_key(tmp_path: Path) -> None:
    """Writers of one job open the folder at the same moment (each tp-rank 0 of a sharded teacher):
    all start, and a writer with another key among them is refused, whichever key came first."""
    def start_together(root: Path, keys: list[CacheKey]) -> list[BaseException | None]:
        gate = threading.Barrier(len(keys))
        errors: list[BaseException | None] = [None] * len(keys)

        def writer(k: int) -> None:
            gate.wait()
            try:
                CacheWriter(root, keys[k], f"r{k}").close()
            except Exception as e:
                errors[k] = e

        threads = [threading.Thread(target=writer, args=(k,)) for k in range(len(keys))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return errors

    for trial in range(30):
        root = tmp_path / f"same-{trial}"
        assert start_together(root, [_key()] * 6) == [None] * 6
        assert CacheKey.from_json(json.loads((root / "key.json").read_text())) == _key()
        assert not list(root.glob("*.tmp"))
    for trial in range(5):
        errors = start_together(tmp_path / f"mixed-{trial}", [_key(), _key(data="d2")])
        assert sum(e is None for e in errors) == 1, errors
        assert all(isinstance(e, CacheError) and "holds other teacher states" in str(e) for e in errors if e)


def test_corrupt_and_truncated_shards_are_named(tmp_path: Path) -> None:
    states = _states(10)
    _write_all(tmp_path, states, _key(), shard_bytes=400)
    assert finalize(tmp_path, _key(), set(states))
    shards = json.loads((tmp_path / MANIFEST).read_text())["shards"]
    victim = tmp_path / shards[1]["file"]
    blob = bytearray(victim.read_bytes())
    blob[5] ^= 0x40
    victim.write_bytes(bytes(blob))
    r = CacheReader(tmp_path, _key())  # sizes fine: the checksum names it on first touch
    first = next(k for k, v in states.items())
    r.read(*first, list(LAYERS))  # shard 0 is intact
    samples_in_victim = json.loads((tmp_path / MANIFEST).read_text())["index"][1]
    with pytest.raises(CacheError, match=f"shard {victim} is corrupt"):
        r.read(samples_in_victim[0][0], samples_in_victim[0][1], list(LAYERS))
    victim.write_bytes(bytes(blob[:-3]))
    with pytest.raises(CacheError, match=f"shard {victim} is {len(blob) - 3} bytes"):
        CacheReader(tmp_path, _key())


def test_interrupted_write_resumes(tmp_path: Path) -> None:
    """A writer killed mid-shard (its open shard half on disk, a torn journal line) loses only that
    shard; a new writer skips what the journal holds, writes the rest, and the cache reads back exactly."""
    states = _states(20)
    key = _key()
    w = CacheWriter(tmp_path, key, "a", 500)
    items = list(states.items())
    for (i, fmt), x in items[:25]:
        w.add(i, fmt, list(LAYERS), x)
    w._stream.flush()  # "killed": the open shard is on disk but not journaled
    part = tmp_path / "part-a.jsonl"
    part.write_text(part.read_text() + '{"file": "shard-a-9')  # a torn last journal line
    journaled = len(states) - len(missing(tmp_path, key, set(states)))
    assert 0 < journaled < 25
    w2 = CacheWriter(tmp_path, key, "a", 500)
    done = [k for k in states if w2.has(*k, list(LAYERS))]
    assert len(done) == journaled and set(done) <= {k for k, _ in items[:25]}
    assert part.read_text().endswith("\n")  # the torn line is gone
    for (i, fmt), x in items:
        w2.add(i, fmt, list(LAYERS), x)
    w2.close()
    assert w2.bytes_written < sum(x.numel() * 4 for x in states.values())  # journaled records were not redone
    assert finalize(tmp_path, key, set(states))
    r = CacheReader(tmp_path, key)
    for k, x in states.items():
        assert torch.equal(r.read(*k, list(LAYERS)), x)


def test_file_digest_changes_with_content_and_uses_the_memo(tmp_path: Path) -> None:
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc")
    memo = tmp_path / "memo.json"
    a = file_digest([f], memo)
    assert file_digest([f], memo) == a and memo.is_file()
    f.write_bytes(b"abd")
    assert file_digest([f], memo) != a
