"""An on-disk index of a region-label JSONL, so merging labels into shards streams.

tools/add_regions.py once read the whole JSONL into a dict: at ~1 KB of Python objects per
line, a billion-sample label file could not fit in memory. `RegionIndex.build` copies the
lines into an SQLite table (standard library, B-tree keyed by sample key) in one pass of
bounded memory; each shard sample is then one indexed lookup. Lines with the same key are
merged in file order, as `read_region_labels` does.
"""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Iterator

from trainer.data.sources import region_label_row

_BATCH = 1000  # rows per INSERT batch (bounded memory)


class RegionIndex:
    def __init__(self, db: sqlite3.Connection, path: Path):
        self.db, self.path = db, path

    @classmethod
    def build(cls, jsonl: str, path: str | Path) -> "RegionIndex":
        """Index `jsonl` into a new SQLite file at `path` (ValueError names a bad line)."""
        path = Path(path)
        if path.exists():
            path.unlink()
        db = sqlite3.connect(str(path))
        db.executescript("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA cache_size=-16000;"
                         "CREATE TABLE labels (key TEXT, line INTEGER, regions TEXT);"
                         "CREATE TABLE used (key TEXT PRIMARY KEY) WITHOUT ROWID;")
        with open(jsonl, encoding="utf-8") as f:
            rows: list[tuple[str, int, str]] = []
            for n, line in enumerate(f, 1):
                row = region_label_row(line, jsonl, n)
                if row is not None:
                    rows.append((row[0], n, json.dumps(row[1])))
                if len(rows) >= _BATCH:
                    db.executemany("INSERT INTO labels VALUES (?, ?, ?)", rows)
                    rows.clear()
            db.executemany("INSERT INTO labels VALUES (?, ?, ?)", rows)
        db.execute("CREATE INDEX labels_key ON labels (key, line)")
        db.commit()
        return cls(db, path)

    def lookup(self, key: str) -> list | None:
        """The regions of every line of `key` in file order (None: no line), marking it used."""
        rows = self.db.execute("SELECT regions FROM labels WHERE key = ? ORDER BY line",
                               (key,)).fetchall()
        if not rows:
            return None
        self.db.execute("INSERT OR IGNORE INTO used VALUES (?)", (key,))
        return [r for (text,) in rows for r in json.loads(text)]

    def duplicate_lines(self) -> int:
        """Lines whose key an earlier line already had."""
        (n,) = self.db.execute("SELECT COUNT(*) - COUNT(DISTINCT key) FROM labels").fetchone()
        return int(n)

    def unused(self, examples: int = 10) -> tuple[int, list[str]]:
        """(how many keys no lookup asked for, the first ``examples`` of them sorted), counted
        in SQLite: no Python pass over the unused keys."""
        where = "FROM labels WHERE key NOT IN (SELECT key FROM used)"
        (count,) = self.db.execute(f"SELECT COUNT(DISTINCT key) {where}").fetchone()
        first = self.db.execute(f"SELECT DISTINCT key {where} ORDER BY key LIMIT ?", (examples,))
        return int(count), [key for (key,) in first]

    def close(self) -> None:
        """Close and delete the index file."""
        self.db.close()
        self.path.unlink(missing_ok=True)
