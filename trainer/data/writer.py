"""Writing shards in the sample format of README.md (used by tools/make_shards.py, add_regions.py,
label_regions.py), and the output name of a shard rewritten one for one."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from webdataset import TarWriter


COMPRESSED = (".gz", ".bz2", ".xz")  # what read_shard reads besides plain tars


class OutputExistsError(FileExistsError):
    pass


def output_shard_name(url: str) -> str:
    """The file name that tools rewriting shards one for one (add_regions.py,
    label_regions.py) give the output of input shard `url`: NAME.tar for NAME.tar, for a
    compressed NAME.tar.gz / .tar.bz2 / .tar.xz (the output is a plain tar), and for NAME.EXT
    or NAME. For a `pipe:` URL, the file that the command's last word names."""
    base = os.path.basename(url.split()[-1].strip("'\""))
    for ext in COMPRESSED:
        if base.endswith(".tar" + ext):
            base = base[:-len(ext)]
            break
    stem = base[:-4] if base.endswith(".tar") else base.rsplit(".", 1)[0]
    return f"{stem}.tar"


def check_output_names(urls: list[str], flag: str = "--shards") -> None:
    """Refuse (ValueError, one line naming both) two input shards that would be written to
    the same output file."""
    seen: dict[str, str] = {}
    for u in urls:
        name = output_shard_name(u)
        if name in seen:
            raise ValueError(f"{flag}: {seen[name]!r} and {u!r} would both be written as {name}")
        seen[name] = u


def check_fresh_output(out_dir: str | Path) -> Path:
    """Refuse to write into an existing non-empty directory (never overwrite shards)."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputExistsError(f"output {str(out)!r} already exists and is not empty; "
                                "refusing to overwrite (choose a new --out)")
    out.mkdir(parents=True, exist_ok=True)
    return out


def encode_sample(sample: dict) -> dict:
    """Text fields to UTF-8, dict "json" fields to JSON bytes, ints in "cls" to text."""
    out = {}
    for k, v in sample.items():
        if k.startswith("__"):
            out[k] = v
        elif k == "json" and isinstance(v, (dict, list)):
            out[k] = json.dumps(v, ensure_ascii=False, sort_keys=True).encode("utf-8")
        elif isinstance(v, str):
            out[k] = v.encode("utf-8")
        elif isinstance(v, int):
            out[k] = str(v).encode("utf-8")
        else:
            out[k] = v
    return out


class ShardSink:
    """Writes samples into `{prefix}-{000000}.tar` shards of `shard_size` samples each.

    Tars are reproducible: fixed mtime, owner and mode, members sorted within a sample.
    """

    def __init__(self, out_dir: str | Path, prefix: str = "shard", shard_size: int = 1000,
                 digits: int = 6, file_name: str | None = None):
        if shard_size <= 0:
            raise ValueError(f"shard_size={shard_size} must be > 0")
        self.out_dir = Path(out_dir)
        self.prefix, self.shard_size, self.digits = prefix, shard_size, digits
        self.file_name = file_name  # one output file of this name, no size limit
        self.paths: list[str] = []
        self.count = 0
        self._writer: TarWriter | None = None
        self._in_shard = 0
        self._keys: set[str] = set()

    def shard_path(self, index: int) -> str:
        if self.file_name is not None:
            if index:
                raise ValueError(f"ShardSink(file_name={self.file_name!r}) writes a single shard")
            return str(self.out_dir / self.file_name)
        return str(self.out_dir / f"{self.prefix}-{index:0{self.digits}d}.tar")

    def write(self, sample: dict) -> None:
        key = sample["__key__"]
        if "." in key.rsplit("/", 1)[-1]:
            raise ValueError(f"sample key {key!r} contains a '.', which webdataset reads as an extension")
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r}")
        self._keys.add(key)
        if self._writer is None or (self._in_shard >= self.shard_size and self.file_name is None):
            self._open_next()
        self._writer.write(encode_sample(sample))
        self._in_shard += 1
        self.count += 1

    def _open_next(self) -> None:
        self.close()
        path = self.shard_path(len(self.paths))
        self.paths.append(path)
        self._writer = TarWriter(path, encoder=False, mtime=0.0, user="upclip", group="upclip", mode=0o644)
        self._in_shard = 0

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def pattern(self) -> str:
        """A brace pattern naming every shard written."""
        if not self.paths:
            return ""
        if len(self.paths) == 1:
            return self.paths[0]
        last = len(self.paths) - 1
        return str(self.out_dir / f"{self.prefix}-{{{0:0{self.digits}d}..{last:0{self.digits}d}}}.tar")

    def __enter__(self) -> "ShardSink":
        return self

    def __exit__(self, *exc) -> None:
        if self.file_name is not None and not self.paths and exc[0] is None:
            self._open_next()  # one output per input shard: an empty input still gets its tar
        self.close()


def write_shards(samples: Iterable[dict], out_dir: str | Path, prefix: str, shard_size: int,
                 info: dict | None = None) -> ShardSink:
    """Write all `samples`, then `dataset.json` (pattern relative to `out_dir`, count, shard
    names, `info`) beside them."""
    with ShardSink(out_dir, prefix, shard_size) as sink:
        for s in samples:
            sink.write(s)
    meta = {"pattern": os.path.basename(sink.pattern()), "count": sink.count,  # relative to out_dir
            "shards": [os.path.basename(p) for p in sink.paths], **(info or {})}
    (Path(out_dir) / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    return sink
