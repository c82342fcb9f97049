"""Read back an offline W&B run (``<dir>/wandb/offline-run-*/run-<id>.wandb``) without the
network: the file is a LevelDB-style log (a 7-byte header ``:W&B`` + magic + version, then
32 KiB blocks of records, each ``crc32c u32, length u16, type u8`` + payload, a record split
over blocks as FIRST/MIDDLE/LAST) of ``wandb_internal_pb2.Record`` protobufs. wandb 0.31 has
no Python reader of its own."""
from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK, HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str | Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a .wandb file ({data[:7]!r})"
    out, pos, parts = [], HEADER, b""
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # block trailer: zero padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        payload, pos = data[pos + HEADER:pos + HEADER + length], pos + HEADER + length
        if kind == 0:
            continue
        parts = payload if kind in (FULL, FIRST) else parts + payload
        if kind in (FULL, LAST):
            rec = pb.Record()
            rec.ParseFromString(parts)
            out.append(rec)
    kinds = [r.WhichOneof("record_type") for r in out]
    assert "exit" in kinds, f"{path}: run file not closed (no exit record), records: {kinds}"
    return out


def history(path: str | Path) -> dict[int, dict]:
    """step -> the scalars logged at it (wandb's own ``_step``/``_runtime``... removed)."""
    out = {}
    for rec in records(path):
        if rec.WhichOneof("record_type") == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                   for i in rec.history.item}
            out[row["_step"]] = {k: v for k, v in row.items() if not k.startswith("_")}
    return out


def config(path: str | Path) -> dict:
    """The run's config (from its run record and config updates), values decoded."""
    out = {}
    for rec in records(path):
        kind = rec.WhichOneof("record_type")
        items = (rec.run.config.update if kind == "run" else
                 rec.config.update if kind == "config" else [])
        for u in items:
            out[u.key or "/".join(u.nested_key)] = json.loads(u.value_json)
    return out


def offline_runs(directory: str | Path) -> list[Path]:
    """The ``run-*.wandb`` files under ``directory/wandb``."""
    return sorted(Path(directory).glob("wandb/offline-run-*/run-*.wandb"))
