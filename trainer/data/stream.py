"""Per-worker sample streams with an exact, cheap resume.

Each (rank, worker) pair reads its own sequence of shards (its slice of the epoch's work list,
position.py: a per-epoch permutation, or an endless draw with replacement when resampled) and
shuffles samples through a
buffer whose picks depend only on the RNG and the sample count, never on the data. So the
buffer's state at any point can be recomputed from a `Cursor` (samples handed out, stream
length once known, sizes of the shards read) by replaying the picks on integers; on resume the
worker re-reads only the shards that still hold buffered samples (usually the last one or two),
and decodes nothing that was already consumed.
"""
from __future__ import annotations

import bisect
import hashlib
import random
import tarfile
import zlib
from dataclasses import dataclass, field
from typing import Iterator

from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

from trainer.data.counters import DataCounters, NoDataError


def mix_seed(*parts: object) -> int:
    """A 64-bit seed from a tuple of parts, stable across processes and Python versions."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


class ShardOpenError(OSError):
    pass


class _CheckedTarInfo(tarfile.TarInfo):
    """Remembers why a tar stream ended: tarfile silently treats a truncated or garbled header
    after the first member as the end of the archive; we want to count those shards."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            tar.upclip_end = None  # the proper end-of-archive (zero) block
            raise
        except tarfile.HeaderError as e:
            tar.upclip_end = f"{type(e).__name__}: {e or 'no end-of-archive block'}"
            raise


def read_shard(url: str) -> Iterator[dict]:
    """Samples of one tar shard: {"__key__", "__url__", ext: bytes, ...}, grouped by key.

    Files are grouped by webdataset's rule (key = path up to the first dot of the basename);
    a repeated extension within a key is reported through a "__duplicate__" entry. Plain tars
    (ustar, GNU, pax: what webdataset, tarfile and GNU tar write) are parsed by `_tar_members`;
    anything else (compressed tars, garbage) goes through `tarfile`, which reports it.
    A truncated or corrupt shard raises tarfile.ReadError after its complete samples.
    """
    try:
        stream = gopen(url, "rb")
    except Exception as e:
        raise ShardOpenError(f"{type(e).__name__}: {e}") from None
    finished = False
    try:
        first = _read(stream, _BLOCK)
        if len(first) == _BLOCK and first != _ZERO_BLOCK and _checksum_ok(first):
            members = _tar_members(stream, first)
        else:
            members = _tarfile_members(_Replay(first, stream))
        yield from _group(members, url)
        finished = True
    finally:
        try:
            stream.close()  # a pipe: command's exit status is checked here
        except Exception:
            if finished:  # a failing command after a complete read is an error; after an early
                raise     # stop (resampled epoch end, an exception already raised) it is not


def _group(members: Iterator[tuple[str, bytes]], url: str) -> Iterator[dict]:
    """(file name, bytes) in tar order -> samples grouped by key."""
    current: dict | None = None
    for name, data in members:
        key, ext = base_plus_ext(name)
        if key is None or key.rsplit("/", 1)[-1].startswith("__"):
            continue
        ext = ext.lower()
        if current is None or key != current["__key__"]:
            if current is not None:
                yield current
            current = {"__key__": key, "__url__": url}
        if ext in current:
            current.setdefault("__duplicate__", []).append(ext)
            continue
        current[ext] = data
    if current is not None:
        yield current


def _tarfile_members(fileobj) -> Iterator[tuple[str, bytes]]:
    """Regular files of any tar `tarfile` reads in stream mode (gz/bz2/xz included)."""
    tar = tarfile.open(fileobj=fileobj, mode="r|*", tarinfo=_CheckedTarInfo)
    for info in tar:
        if not info.isreg():
            continue
        data = tar.extractfile(info).read()
        tar.members = []  # streaming: keep no member list
        yield info.name, data
    if getattr(tar, "upclip_end", None):
        raise tarfile.ReadError(f"truncated or corrupt tar ({tar.upclip_end}) at byte {tar.offset}")


# ------------------------------------------------------------------ a lean plain-tar reader
# tarfile spends ~0.2 ms of Python per header (webdataset writes a pax header before every
# file); this reader does what tarfile's stream mode does for regular files in a few us.

_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_REGULAR = (b"0", b"\0", b"7")
_SUPPORTED = _REGULAR + (b"1", b"2", b"3", b"4", b"5", b"6", b"L", b"K", b"S")
_ENC = "utf-8"  # tarfile's default on Linux (the file-system encoding), surrogateescape


class _Replay:
    """A read-only stream that first returns `head`, then the rest of `stream`."""

    def __init__(self, head: bytes, stream):
        self.head, self.stream = head, stream

    def read(self, n: int = -1) -> bytes:
        if not self.head:
            return self.stream.read(n)
        if n is None or n < 0:
            out, self.head = self.head + self.stream.read(), b""
            return out
        out, self.head = self.head[:n], self.head[n:]
        if len(out) < n:
            out += self.stream.read(n - len(out))
        return out


def _read(stream, n: int) -> bytes:
    """Exactly n bytes, fewer only at the end of the stream."""
    data = stream.read(n)
    if len(data) < n and data:
        parts = [data]
        got = len(data)
        while got < n:
            more = stream.read(n - got)
            if not more:
                break
            parts.append(more)
            got += len(more)
        data = b"".join(parts)
    return data


def _number(field: bytes) -> int:
    """A tar number field: octal text, or GNU base-256 (first byte 0x80 / 0xff)."""
    if field[0] in (0o200, 0o377):
        n = int.from_bytes(field[1:], "big")
        return n - 256 ** (len(field) - 1) if field[0] == 0o377 else n
    try:
        return int(field.split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        raise tarfile.ReadError(f"truncated or corrupt tar (invalid number field {field!r})") from None


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode(_ENC, "surrogateescape")


def _checksum_ok(block: bytes) -> bool:
    """tarfile's test: the stored checksum equals the unsigned or the signed byte sum of the
    header with the checksum field read as 8 spaces. adler32 gives the unsigned sum mod 65521
    in C; the exact Python sums run only when that test fails."""
    try:
        stored = _number(block[148:156])
    except tarfile.ReadError:
        return False
    field = sum(block[148:156])
    if (stored - 256 + field) % 65521 == ((zlib.adler32(block) & 0xFFFF) - 1) % 65521:
        return True
    unsigned = sum(block) - field + 256
    signed = unsigned - 256 * sum(1 for i, b in enumerate(block) if b >= 128 and not 148 <= i < 156)
    return stored in (unsigned, signed)


def _pax_records(data: bytes) -> dict[str, str]:
    """Pax extended-header records `LEN key=value` + newline."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data) and data[pos] != 0:
        sp = data.find(b" ", pos)
        try:
            length = int(data[pos:sp])
        except ValueError:
            raise tarfile.ReadError("truncated or corrupt tar (invalid pax header)") from None
        if length <= 0 or sp < 0:
            raise tarfile.ReadError("truncated or corrupt tar (invalid pax header)")
        key, _, value = data[sp + 1: pos + length - 1].partition(b"=")
        out[key.decode(_ENC, "surrogateescape")] = value.decode(_ENC, "surrogateescape")
        pos += length
    return out


def _tar_members(stream, block: bytes | None) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the regular files of a plain tar stream whose first header is `block`.

    Like tarfile's stream mode: pax (local and global) `path`/`size`, GNU long names, ustar
    prefixes; other member types are skipped; the first zero block ends the archive. Raises
    tarfile.ReadError on a truncated header or data, a bad checksum, a missing end block.
    """
    pax_global: dict[str, str] = {}
    pax: dict[str, str] = {}
    long_name: str | None = None

    def data_of(size: int) -> bytes:
        data = _read(stream, size)
        if len(data) < size:
            raise tarfile.ReadError("truncated or corrupt tar (unexpected end of data)")
        if size % _BLOCK:
            _read(stream, _BLOCK - size % _BLOCK)  # padding; a short one fails at the next header
        return data

    while True:
        if block is None:
            block = _read(stream, _BLOCK)
        if len(block) < _BLOCK:
            raise tarfile.ReadError("truncated or corrupt tar (" + (
                "truncated header" if block else "no end-of-archive block") + ")")
        if block == _ZERO_BLOCK:
            return
        if not _checksum_ok(block):
            raise tarfile.ReadError("truncated or corrupt tar (bad checksum)")
        kind, size = block[156:157], _number(block[124:136])
        header, block = block, None
        if kind in (b"x", b"X", b"g"):
            records = _pax_records(data_of(size))
            (pax_global if kind == b"g" else pax).update(records)
            continue
        if kind in (b"L", b"K"):
            data = data_of(size)
            if kind == b"L":
                long_name = _text(data)
            continue
        info = {**pax_global, **pax} if pax_global else pax
        if kind == b"S" or any(k.startswith("GNU.sparse") for k in info):
            raise tarfile.ReadError("truncated or corrupt tar (sparse members are not supported)")
        name = long_name
        if name is None:
            name = _text(header[0:100])
            prefix = _text(header[345:500])
            if prefix:
                name = prefix + "/" + name
        if "path" in info:
            name = info["path"]
        if "size" in info:
            try:
                size = int(info["size"])
            except ValueError:
                raise tarfile.ReadError("truncated or corrupt tar (invalid pax size)") from None
        pax, long_name = {}, None
        regular = kind in _REGULAR and not (kind == b"\0" and name.endswith("/"))
        if regular:
            yield name, data_of(size)
        elif kind not in _SUPPORTED:
            data_of(size)  # tarfile skips the data of unknown member types


@dataclass
class Cursor:
    """Where one worker's stream stands, as seen by the trainer (after the last consumed batch)."""

    emitted: int = 0                      # samples the shuffle buffer handed out
    total: int = -1                       # the stream's length once it ended (-1: not yet)
    shard_sizes: list[int] = field(default_factory=list)  # samples read per finished shard
    batches: int = 0                      # batches this worker delivered and the trainer took
    done: bool = False                    # stream finished and its last batch consumed
    counters: dict = field(default_factory=dict)
    # label-grouped batches (grouping.py): hand-outs waiting in a partly filled group
    pending: list[int] = field(default_factory=list)
    checked: list[int] = field(default_factory=list)  # of those, decoded (counted) once already

    def to_dict(self) -> dict:
        return {"emitted": self.emitted, "total": self.total, "shard_sizes": list(self.shard_sizes),
                "batches": self.batches, "done": self.done, "counters": dict(self.counters),
                "pending": list(self.pending), "checked": list(self.checked)}

    @classmethod
    def from_dict(cls, d: dict) -> "Cursor":
        return cls(int(d["emitted"]), int(d["total"]), [int(v) for v in d["shard_sizes"]],
                   int(d["batches"]), bool(d["done"]),
                   {k: int(v) for k, v in d["counters"].items()},
                   [int(v) for v in d.get("pending", [])], [int(v) for v in d.get("checked", [])])


def replay_buffer(size: int, rng: random.Random, emitted: int, total: int,
                  handouts: dict[int, int] | None = None) -> tuple[list[int], int]:
    """Replay the shuffle picks on integers: (buffer layout as raw indices, samples read).

    `rng` is advanced exactly as the real buffer advanced it after `emitted` hand-outs.
    ``handouts``: {hand-out index: _} whose values are set to the raw index handed out then.
    """
    buf: list[int] = []
    n_read = out = 0
    while out < emitted:
        if total < 0 or n_read < total:
            if len(buf) < size:
                buf.append(n_read)
            else:
                j = rng.randrange(size)
                if handouts is not None and out in handouts:
                    handouts[out] = buf[j]
                buf[j] = n_read
                out += 1
            n_read += 1
        else:
            if not buf:
                raise RuntimeError(f"cursor says {emitted} samples were handed out but the "
                                   f"stream holds only {total}")
            j = rng.randrange(len(buf))
            buf[j], buf[-1] = buf[-1], buf[j]
            if handouts is not None and out in handouts:
                handouts[out] = buf[-1]
            buf.pop()
            out += 1
    return buf, n_read


class SampleStream:
    """A worker's shuffled raw samples, resumable from a Cursor; yields (index, raw sample).

    The stream reads `ShardItem`s (position.py): a shard, or the samples of a shard that an
    earlier data layout left unread; a finished item's size counts the samples it yielded.

    The index counts hand-outs of the buffer; the buffer fills to `buffer_size`, then hands out
    a random slot for every new sample, then drains in random order at the end of the stream.
    """

    def __init__(self, shards: "callable", buffer_size: int, seed: int, cursor: Cursor,
                 counters: DataCounters, max_empty_shards: int = 1000):
        self.shards = shards              # () -> Iterator[ShardItem], the worker's shards
        self.size = max(1, buffer_size)
        self.seed = seed
        self.start = cursor
        self.counters = counters
        self.max_empty_shards = max_empty_shards
        self.shard_sizes: list[int] = []  # finished shards, this pass
        self.n_read = 0
        self.ended = False

    def _source(self, n_read: int, needed: list[int]) -> Iterator[tuple[int, dict]]:
        """Raw samples with their stream index; below `n_read` only the `needed` ones, and
        finished shards that hold none of them are not even opened."""
        saved = self.start.shard_sizes
        idx, empty_run = 0, 0
        for k, shard in enumerate(self.shards()):
            url = shard.url
            if k < len(saved) and idx + saved[k] <= n_read:
                lo = bisect.bisect_left(needed, idx)
                if lo == len(needed) or needed[lo] >= idx + saved[k]:
                    self.shard_sizes.append(saved[k])
                    idx += saved[k]
                    self.n_read = idx
                    continue
            count = 0
            try:
                for raw in shard.select(read_shard(url)):
                    i = idx + count
                    count += 1
                    self.n_read = idx + count
                    if i < n_read and not sorted_contains(needed, i):
                        continue
                    for ext in raw.pop("__duplicate__", []):
                        if i >= n_read:
                            self.counters.record("duplicate_file", f"{url}:{raw['__key__']}", ext)
                    yield i, raw
            except ShardOpenError as e:
                if idx + count >= n_read:
                    self.counters.record("shard_open_error", url, str(e)[:200])
            except Exception as e:  # truncated / corrupt tar, failing pipe: lose the rest
                if idx + count >= n_read:
                    self.counters.record("shard_read_error", url, f"{type(e).__name__}: {e}"[:200])
            self.shard_sizes.append(count)
            idx += count
            self.n_read = idx
            empty_run = 0 if count else empty_run + 1
            if empty_run >= self.max_empty_shards:
                raise NoDataError(f"{empty_run} shards in a row yielded no sample (last: {url}; "
                                  f"{self.counters.summary()})")

    def __iter__(self) -> Iterator[tuple[int, dict]]:
        rng = random.Random(mix_seed("buffer", self.seed))
        emitted = self.start.emitted
        layout, n_read = replay_buffer(self.size, rng, emitted, self.start.total)
        position = {raw_idx: pos for pos, raw_idx in enumerate(layout)}
        needed = sorted(position)
        buf: list = [None] * len(layout)
        restored, checked = 0, False
        for i, raw in self._source(n_read, needed):
            if i < n_read:
                buf[position[i]] = raw
                restored += 1
                continue
            if not checked:
                if restored != len(layout):
                    raise _changed(restored, len(layout))
                checked = True
            if len(buf) < self.size:
                buf.append(raw)
                continue
            j = rng.randrange(self.size)
            out, buf[j] = buf[j], raw
            yield emitted, out
            emitted += 1
        if restored < len(layout):
            raise _changed(restored, len(layout))
        self.ended = True
        while buf:
            j = rng.randrange(len(buf))
            buf[j], buf[-1] = buf[-1], buf[j]
            yield emitted, buf.pop()
            emitted += 1


def sorted_contains(sorted_list, x: int) -> bool:
    """Whether `x` is in the ascending sequence `sorted_list`."""
    i = bisect.bisect_left(sorted_list, x)
    return i < len(sorted_list) and sorted_list[i] == x


def _changed(restored: int, expected: int) -> RuntimeError:
    return RuntimeError(f"resume: restored {restored} of {expected} buffered samples; the shards "
                        "changed since the checkpoint (same URLs, same contents are required)")
