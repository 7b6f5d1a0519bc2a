"""Read an offline wandb run's transaction log (`run-*.wandb`) back, for tests.

The file is a 7-byte header (":W&B", magic, version) followed by LevelDB-log style records in
32 KiB blocks: crc32 (4 bytes), length (2, little endian), type (1: full, 2: first, 3: middle,
4: last), then the payload, a serialized `Record` protobuf.
"""

from __future__ import annotations

import json
from pathlib import Path

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a wandb transaction log")
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer padding
            pos += left
            continue
        length = int.from_bytes(data[pos + 4:pos + 6], "little")
        kind = data[pos + 6]
        payload = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == FULL:
            whole = payload
        elif kind == FIRST:
            pending = payload
            continue
        elif kind == MIDDLE:
            pending += payload
            continue
        elif kind == LAST:
            whole, pending = pending + payload, b""
        else:
            continue
        record = wandb_internal_pb2.Record()
        record.ParseFromString(whole)
        yield record


def history(path: Path) -> list[dict]:
    """Every logged history row as {key: value}."""
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def history_with(path: Path, key: str, at_least: int = 1, timeout: float = 30.0) -> list[dict]:
    """`history(path)` once it holds `at_least` rows with `key`: wandb's service process writes the
    offline log asynchronously, and may still be flushing it when the training process moves on."""
    import time

    deadline = time.time() + timeout
    while True:
        rows = history(path)
        if sum(key in row for row in rows) >= at_least or time.time() > deadline:
            return rows
        time.sleep(0.2)
