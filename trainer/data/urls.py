"""Shard URL expansion: brace patterns, "::" lists, list files, directories, pipe: commands.

Torch-free (webdataset's package imports torch): trainer/train.py checks local shards with it
before any heavy import.
"""
from __future__ import annotations

import glob
import os
import re

import braceexpand

LIST_FILE_SUFFIXES = (".txt", ".list", ".lst")


def _wds_expand(spec: str) -> list[str]:
    """webdataset.shardlists.expand_urls (1.0): split on "::", substitute ${NAME} with the
    environment variable WDS_NAME (repeatedly, up to 10 levels), expand braces."""
    def lookup(m: re.Match) -> str:
        name = "WDS_" + m.group(1)
        if name not in os.environ:
            raise ValueError(f"{spec!r}: ${{{m.group(1)}}} needs the environment variable {name}")
        return os.environ[name]

    out: list[str] = []
    for url in spec.split("::"):
        for _ in range(10):
            last, url = url, re.sub(r"\$\{(\w+)\}", lookup, url)
            if url == last:
                break
        out.extend(braceexpand.braceexpand(url))
    return out


def is_remote(url: str) -> bool:
    """pipe:, http(s)://, s3:// and other schemes (not file:): read by webdataset's gopen."""
    return ":" in url.split("/", 1)[0] and not url.startswith("file:")


def check_local_shards(spec: str | list[str], key: str = "data.train_urls") -> None:
    """Raise FileNotFoundError naming the first local shards of ``spec`` that do not exist
    (after the expansion the pipeline does; remote URLs are not checked)."""
    urls = expand_urls(spec, key)
    local = [re.sub(r"^file:(//)?", "", u) for u in urls if not is_remote(u)]
    missing = [u for u in local if not os.path.exists(u)]
    if missing:
        first = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise FileNotFoundError(f"{key}: {len(missing)} of {len(local)} local shards do not "
                                f"exist (first: {first})")


def expand_urls(spec: str | list[str], key: str = "data.train_urls") -> list[str]:
    """Turn a URL spec into the ordered list of shard URLs.

    - "a-{000..009}.tar" brace patterns, several joined by "::" (webdataset's rules, which also
      substitute ${WDS_*} environment variables);
    - a local list file (*.txt, *.list, *.lst): one URL or pattern per line, "#" comments;
    - a local directory: its *.tar files, sorted; a local glob with "*";
    - clip_benchmark's webdataset split (a directory with nshards.txt = N): its 0.tar .. N-1.tar;
    - "pipe:CMD", http(s)://, file: and other schemes webdataset's gopen reads, passed through.
    """
    items = [spec] if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for item in items:
        for url in _wds_expand(item.strip()) if item.strip() else []:
            out.extend(_expand_one(url, key))
    if not out:
        raise ValueError(f"{key}={spec!r}: no shard URLs")
    return out


def _expand_one(url: str, key: str) -> list[str]:
    if is_remote(url):
        return [url]
    path = re.sub(r"^file:(//)?", "", url)
    if path.endswith(LIST_FILE_SUFFIXES):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{key}: list file {path!r} does not exist")
        urls: list[str] = []
        with open(path) as f:
            for line in f:
                line = line.split("#", 1)[0].strip()
                if line:
                    base = os.path.dirname(os.path.abspath(path))
                    if not line.startswith("/") and ":" not in line.split("/", 1)[0]:
                        line = os.path.join(base, line)  # relative entries: relative to the list file
                    urls.extend(expand_urls(line, key))
        return urls
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "nshards.txt")):
        return _clip_benchmark_split(path, key)
    if os.path.isdir(path):
        found = sorted(glob.glob(os.path.join(path, "*.tar")))
        if not found:
            raise FileNotFoundError(f"{key}: directory {path!r} holds no *.tar shards")
        return found
    if any(c in path for c in "*?["):
        found = sorted(glob.glob(path))
        if not found:
            raise FileNotFoundError(f"{key}: glob {path!r} matches no file")
        return found
    return [url]


def _clip_benchmark_split(path: str, key: str) -> list[str]:
    """``path/{0..N-1}.tar`` with N read from ``path/nshards.txt`` (clip_benchmark's layout)."""
    text = open(os.path.join(path, "nshards.txt")).read().strip()
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{key}: {os.path.join(path, 'nshards.txt')} holds {text!r}, expected "
                         "a shard count >= 1")
    shards = [os.path.join(path, f"{i}.tar") for i in range(int(text))]
    missing = [s for s in shards if not os.path.isfile(s)]
    if missing:
        raise FileNotFoundError(f"{key}: nshards.txt in {path!r} says {text} shards but "
                                f"{len(missing)} are missing (first: {missing[0]!r})")
    return shards
