"""Counting bad data: every skipped or repaired item is counted per reason and logged sparsely.

Reasons ending in a sample being skipped are in SKIP_REASONS; the others repair or trim a
sample that still trains (a clamped box, a malformed JSON whose caption came from .txt, ...).
When nothing is left to train on (an epoch in which no shard could be read), the data raises
NoDataError: bad input (the trainer exits 2 with its one line), not a crash.
"""
from __future__ import annotations

import logging
from collections import Counter

log = logging.getLogger("trainer.data")

# sample (or whole shard) skipped
SKIP_REASONS = {
    "shard_open_error": "a shard could not be opened",
    "shard_read_error": "a shard was truncated or corrupt; its remaining samples are lost",
    "duplicate_file": "a key had the same extension twice in a tar; the later file is ignored",
    "missing_image": "no .jpg/.jpeg/.png/.webp field",
    "corrupt_image": "the image did not decode (truncated, corrupt, empty, too large)",
    "missing_caption": "no usable caption in .txt nor in the JSON",
    "sample_error": "an unexpected error while processing the sample",
}
# sample kept, something repaired or dropped inside it
FIX_REASONS = {
    "malformed_json": "the .json did not parse or was not an object; regions ignored",
    "region_malformed": "a region without a 4-number bbox or a caption; region dropped",
    "box_inverted": "x1 <= x0 or y1 <= y0; region dropped",
    "box_outside": "a box entirely outside the stored image; region dropped",
    "box_clamped": "a box partly outside the stored image; clamped to it",
    "box_cropped_away": "a box left the augmented crop (or became too small); region dropped",
    "regions_truncated": "more than data.max_regions regions; the extra ones dropped",
}
REASONS = {**SKIP_REASONS, **FIX_REASONS}
# routine events of augmentation, logged at debug level only
QUIET_REASONS = {"box_cropped_away", "regions_truncated"}


class NoDataError(RuntimeError):
    """The data gave nothing to train on: every shard of an epoch failed to open or read, or
    the samples that were read do not make one batch."""


SHARD_FAILURES = ("shard_open_error", "shard_read_error")


class DataCounters:
    """Per-reason counts plus `samples_ok`; plain dict state, so it pickles and serialises."""

    def __init__(self, counts: dict[str, int] | None = None, log_first: int = 3):
        self.counts: Counter = Counter(counts or {})
        self.log_first = log_first

    def record(self, reason: str, where: str = "", detail: str = "", n: int = 1) -> None:
        """Count `reason`; log the first few of each reason, then every power of ten."""
        if reason not in REASONS and reason != "samples_ok":
            raise KeyError(f"unknown data-counter reason {reason!r}")
        self.counts[reason] += n
        c = self.counts[reason]
        if reason == "samples_ok" or not (c - n < self.log_first or _crossed_power_of_ten(c - n, c)):
            return
        level = logging.DEBUG if reason in QUIET_REASONS else logging.WARNING
        log.log(level, "data: %s (%d so far) at %s%s", reason, c, where, f": {detail}" if detail else "")

    def ok(self) -> None:
        self.counts["samples_ok"] += 1

    def __getitem__(self, reason: str) -> int:
        return self.counts.get(reason, 0)

    def skipped(self) -> int:
        return sum(v for k, v in self.counts.items() if k in SKIP_REASONS and not k.startswith("shard_"))

    def as_dict(self) -> dict[str, int]:
        return {k: int(v) for k, v in sorted(self.counts.items()) if v}

    def merged(self, *others: "DataCounters | dict") -> "DataCounters":
        out = Counter(self.counts)
        for o in others:
            out.update(o.counts if isinstance(o, DataCounters) else o)
        return DataCounters(dict(out))

    def minus(self, earlier: "DataCounters") -> "DataCounters":
        """The counts since ``earlier`` (a copy of these counters taken before)."""
        return DataCounters({k: v - earlier[k] for k, v in self.counts.items() if v - earlier[k]})

    def summary(self) -> str:
        d = self.as_dict()
        return ", ".join(f"{k}={v}" for k, v in d.items()) or "no samples"

    def __repr__(self) -> str:
        return f"DataCounters({self.as_dict()})"


def _crossed_power_of_ten(before: int, after: int) -> bool:
    p = 1
    while p <= after:
        if before < p <= after:
            return True
        p *= 10
    return False
