"""Read an offline W&B run back: the records of its `.wandb` file (W&B's own log format).

The file is a 7-byte header (":W&B", magic 0xBEE1, version 0) followed by 32 KiB blocks of
chunks, each with a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last);
a chunk never straddles a block, and a block tail shorter than a header is zero padding.
Each assembled record is a serialized `wandb_internal_pb2.Record`.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

_BLOCK, _HEADER = 32768, 7


def records(path: Path) -> list[Any]:
    """Every record of a .wandb file, in order."""
    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:_HEADER])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), f"{path}: not a W&B log ({ident!r})"
    out, pos, parts = [], _HEADER, b""
    while pos + _HEADER <= len(data):
        room = _BLOCK - pos % _BLOCK
        if room < _HEADER:
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        if kind == 0 and length == 0:  # zero padding at the end of a block
            pos += room
            continue
        chunk = data[pos + _HEADER:pos + _HEADER + length]
        pos += _HEADER + length
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(parts)
            out.append(rec)
    return out


def history(path: Path) -> list[dict[str, Any]]:
    """The history rows (what `run.log` sent) of a .wandb file, values decoded from JSON."""
    rows = []
    for rec in records(path):
        if rec.WhichOneof("record_type") != "history":
            continue
        row: dict[str, Any] = {}
        for item in rec.history.item:
            if item.key or len(item.nested_key) == 1:
                row[item.key or item.nested_key[0]] = json.loads(item.value_json)
            else:  # media (images, tables) arrive as nested fields of their key
                node = row.setdefault(item.nested_key[0], {})
                for part in item.nested_key[1:-1]:
                    node = node.setdefault(part, {})
                node[item.nested_key[-1]] = json.loads(item.value_json)
        rows.append(row)
    return rows
