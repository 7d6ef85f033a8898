"""Saved prompts: several recent prompts in sequences of the KV cache (LRU), and the static prefix on disk.

llama.cpp evaluates a prompt once. In memory a saved prompt is another sequence of the one unified KV
cache (llama_runtime.py), sharing cells with the prompts it has in common; this module keeps their tokens
and picks, for a new prompt, the one that shares the longest token prefix with it. It holds no llama.cpp
object: LlamaBackend moves the sequences.

In memory the saved prompts are bounded by the KV cache's cells and a number of sequences (LRU;
prefilled prefixes go last). On disk the prefilled static prefix is kept (a copy of its sequence,
``llama_state_seq_get_data``), so that the first turn after a restart does not evaluate it again. A
state file is::

    MAGIC | u32 header length | header (JSON) | tokens (int32 LE) | state bytes

The header names the model file (path, size, mtime), n_ctx and the llama-cpp-python version, the
key, the token count, the state's size and the SHA-256 of tokens + state. A file is handed to
llama.cpp only when its size, header and checksum all check out; otherwise it is deleted and the
prefix is evaluated (and written) again.
"""

from __future__ import annotations

from collections.abc import Callable
import contextlib
from dataclasses import dataclass
import hashlib
import itertools
import json
import logging
import os
from pathlib import Path
import struct
import threading
from typing import Any

import numpy as np

_LOGGER = logging.getLogger(__name__)

MAGIC = b"SARAIKV1"
FORMAT = 1
SUFFIX = ".kvstate"
TMP_SUFFIX = ".tmp"
MAX_HEADER = 64 * 1024
_LEN = struct.Struct("<I")
_PREFIX_LEN = len(MAGIC) + _LEN.size


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the common prefix of two token arrays."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n


def prefix_key(tokens: np.ndarray) -> str:
    """The key of a prefilled prefix: a hash of its tokens."""
    return "prefix:" + hashlib.sha256(np.asarray(tokens, dtype="<i4").tobytes()).hexdigest()[:24]


def model_identity(path: str, n_ctx: int, runtime: str) -> dict[str, Any]:
    """What a saved state depends on: the model file (path, size, mtime), the context size, the runtime."""
    real = os.path.realpath(path)
    st = os.stat(real)
    return {
        "format": FORMAT,
        "model": real,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "n_ctx": n_ctx,
        "runtime": runtime,
    }


@dataclass(eq=False, slots=True)
class CacheEntry:
    """One saved prompt: its tokens, the KV-cache sequence holding it (in memory), its file (on disk), or both."""

    key: str
    tokens: np.ndarray
    seq: int | None = None
    path: Path | None = None
    pinned: bool = False  # a prefilled prefix: dropped from memory after the conversations
    used: int = 0


@dataclass(slots=True)
class _Header:
    key: str
    n_tokens: int
    payload: int
    digest: str
    identity: dict[str, Any]


class StateStore:
    """State files in one directory, for one model identity; at most ``max_files`` files and ``max_bytes`` (LRU)."""

    def __init__(
        self,
        directory: str | Path,
        identity: dict[str, Any],
        max_files: int = 4,
        max_bytes: int | None = None,
    ) -> None:
        """Nothing is read or written yet."""
        self.directory = Path(directory)
        self.identity = identity
        self.max_files = max(1, max_files)
        self.max_bytes = max_bytes
        self.rejected = 0  # files found corrupt, stale or refused, and deleted

    def path_for(self, key: str) -> Path:
        """The file of a key for this model identity."""
        name = hashlib.sha256(json.dumps([self.identity, key], sort_keys=True).encode()).hexdigest()[:32]
        return self.directory / f"{name}{SUFFIX}"

    def files(self) -> list[Path]:
        """The state files in the directory (any identity), oldest use first."""
        try:
            found = [p for p in self.directory.iterdir() if p.name.endswith(SUFFIX) and p.is_file()]
        except OSError:
            return []
        return sorted(found, key=_mtime)

    def disk_bytes(self) -> int:
        """Bytes of the state files."""
        return sum(_size(p) for p in self.files())

    def scan(self) -> list[tuple[Path, str, np.ndarray, int]]:
        """(path, key, tokens, state size) of every valid file of this identity, newest first.

        A file whose header does not parse is deleted; a file of another identity is left alone (another
        model, another context size), unless it was written for an older copy of this model file or
        another runtime (stale: deleted).
        """
        out: list[tuple[Path, str, np.ndarray, int]] = []
        for path in reversed(self.files()):
            header: _Header | None = None
            tokens = np.zeros(0, dtype=np.int32)
            try:
                with path.open("rb") as fh:
                    header = self._header(fh, _size(path))
                    if header is not None and header.identity == self.identity:
                        tokens = np.fromfile(fh, dtype="<i4", count=header.n_tokens).astype(np.int32)
            except OSError as err:  # pragma: no cover - listed a moment ago, unreadable or gone now
                _LOGGER.debug("Cannot read the prompt state %s: %s", path, err)
            if header is None:
                self.reject(path, "unreadable")
            elif header.identity != self.identity:
                if self._stale(header.identity):
                    self.reject(path, "stale")  # this model file changed, or the runtime did: never usable again
            elif len(tokens) == header.n_tokens:
                out.append((path, header.key, tokens, header.payload))
        return out

    def _stale(self, identity: dict[str, Any]) -> bool:
        """A state of this model file (any context size) written for an older file or another runtime."""
        same_file = identity.get("model") == self.identity["model"]
        return same_file and any(identity.get(k) != self.identity[k] for k in ("format", "size", "mtime_ns", "runtime"))

    def _header(self, fh: Any, size: int) -> _Header | None:
        """The header of an open state file, when it is well-formed and its sizes add up to ``size``."""
        start = fh.read(_PREFIX_LEN)
        if len(start) != _PREFIX_LEN or start[: len(MAGIC)] != MAGIC:
            return None
        (length,) = _LEN.unpack(start[len(MAGIC) :])
        if length > MAX_HEADER or _PREFIX_LEN + length > size:
            return None
        try:
            raw = json.loads(fh.read(length).decode("utf-8"))
        except ValueError:
            return None
        if not isinstance(raw, dict):
            return None
        key, n_tokens, payload = raw.get("key"), raw.get("n_tokens"), raw.get("payload")
        digest, identity = raw.get("sha256"), raw.get("identity")
        if not (
            isinstance(key, str)
            and isinstance(n_tokens, int)
            and isinstance(payload, int)
            and isinstance(digest, str)
            and isinstance(identity, dict)
            and 0 < n_tokens <= int(identity.get("n_ctx", 0) or 0)
            and payload > 0
            and _PREFIX_LEN + length + 4 * n_tokens + payload == size
        ):
            return None
        return _Header(key, n_tokens, payload, digest, identity)

    def write(self, key: str, tokens: np.ndarray, data: bytearray) -> Path | None:
        """Write a state (atomically: a temporary file, then a rename); keep the directory in bounds."""
        path = self.path_for(key)
        token_bytes = np.asarray(tokens, dtype="<i4").tobytes()
        digest = hashlib.sha256(token_bytes)
        digest.update(data)
        header = json.dumps(
            {
                "key": key,
                "n_tokens": len(tokens),
                "payload": len(data),
                "sha256": digest.hexdigest(),
                "identity": self.identity,
            },
            sort_keys=True,
        ).encode()
        tmp = path.with_name(path.name + TMP_SUFFIX)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with tmp.open("wb") as fh:
                fh.write(MAGIC + _LEN.pack(len(header)) + header)
                fh.write(token_bytes)
                fh.write(data)
            tmp.replace(path)
        except OSError as err:
            _LOGGER.warning("Cannot write the prompt state to %s: %s", self.directory, err)
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            return None
        self.prune(keep=path)
        return path if path.is_file() else None

    def read(self, path: Path, key: str, tokens: np.ndarray) -> bytearray | None:
        """The state bytes of a file, only if its header, size, tokens and checksum all match (else deleted)."""
        try:
            with path.open("rb") as fh:
                header = self._header(fh, _size(path))
                if header is None or header.identity != self.identity or header.key != key:
                    self.reject(path, "changed")
                    return None
                token_bytes = fh.read(4 * header.n_tokens)
                data = bytearray(header.payload)
                got = fh.readinto(data)
        except OSError as err:
            _LOGGER.warning("Cannot read the prompt state %s: %s", path, err)
            return None
        digest = hashlib.sha256(token_bytes)
        digest.update(data)
        if (
            got != header.payload
            or digest.hexdigest() != header.digest
            or token_bytes != np.asarray(tokens, dtype="<i4").tobytes()
        ):
            self.reject(path, "corrupt")
            return None
        _touch(path)
        return data

    def reject(self, path: Path, why: str) -> None:
        """Delete a state file that cannot be used."""
        _LOGGER.info("Ignoring the %s prompt state %s (deleted; it is rebuilt on the next prefill)", why, path.name)
        self.rejected += 1
        try:
            path.unlink(missing_ok=True)
        except OSError as err:  # pragma: no cover - a read-only directory
            _LOGGER.warning("Cannot delete the prompt state %s: %s", path, err)

    def prune(self, keep: Path | None = None) -> None:
        """Delete the least recently used files beyond ``max_files`` or ``max_bytes``."""
        files = self.files()
        total = sum(_size(p) for p in files)
        for path in files:
            over = len(files) > self.max_files or (self.max_bytes is not None and total > self.max_bytes)
            if not over:
                break
            if path == keep:
                continue
            files.remove(path)
            total -= _size(path)
            path.unlink(missing_ok=True)


def delete_cache_dir(directory: str | Path) -> int:
    """Delete every prompt-state file SARAi wrote in ``directory`` (and the directory, when it is then empty).

    Only SARAi's own files are removed: the directory may be shared. Returns how many were deleted.
    """
    root = Path(directory)
    removed = 0
    try:
        paths = list(root.iterdir())
    except OSError:
        return 0
    for path in paths:
        if path.name.endswith((SUFFIX, SUFFIX + TMP_SUFFIX)) and path.is_file():
            path.unlink(missing_ok=True)
            removed += 1
    try:
        root.rmdir()
    except OSError:  # not empty (other files), or gone
        pass
    return removed


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:
        pass


class PromptCache:
    """Saved prompts by key (a conversation, or a prefilled prefix): sequences of the KV cache (LRU) and files.

    A saved prompt in memory is a sequence id (``slots``: 1..n) of the one unified KV cache; saving and restoring
    only tag cells with another sequence id (llama_runtime.py). The KV cache's cells bound what the sequences
    hold together; when a batch finds none free, ``evict`` drops the least recently used saved sequence
    (the prefilled prefixes last). Thread-safe: the backend's worker thread changes it, diagnostics read it.
    """

    def __init__(self, slots: int, store: StateStore | None = None) -> None:
        """No saved prompt yet; ``slots`` sequences for them; ``store`` (optional) keeps the prefixes on disk."""
        self.slots = max(1, slots)
        self.store = store
        self._entries: dict[str, CacheEntry] = {}
        self._clock = itertools.count(1)
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.saves = 0
        self.restores = 0
        self.disk_restores = 0
        self.evictions = 0

    def __len__(self) -> int:
        """Entries (in memory or on disk)."""
        return len(self._entries)

    def get(self, key: str) -> CacheEntry | None:
        """The entry of a key."""
        return self._entries.get(key)

    def resident(self) -> list[CacheEntry]:
        """The entries held in KV-cache sequences."""
        with self._lock:
            return [e for e in self._entries.values() if e.seq is not None]

    def touch(self, entry: CacheEntry) -> None:
        """Mark an entry as just used."""
        entry.used = next(self._clock)

    def best(self, tokens: np.ndarray) -> tuple[CacheEntry | None, int]:
        """The entry sharing the longest prefix with ``tokens`` (ties: in memory first, then the shortest)."""
        best: CacheEntry | None = None
        rank = (0, False, 0)
        with self._lock:
            entries = list(self._entries.values())
        for entry in entries:
            common = common_prefix(entry.tokens, tokens)
            candidate = (common, entry.seq is not None, -len(entry.tokens))
            if common and candidate > rank:
                best, rank = entry, candidate
        return best, rank[0]

    def slot_for(self, key: str) -> int:
        """The sequence to save ``key``'s prompt in: its own, a free one, or the least recently used entry's
        (that entry leaves memory; the caller replaces the sequence's cells)."""
        with self._lock:
            old = self._entries.get(key)
            if old is not None and old.seq is not None:
                return old.seq
            taken = {e.seq for e in self._entries.values() if e.seq is not None}
            free = [s for s in range(1, self.slots + 1) if s not in taken]
        if free:
            return free[0]
        seq = self.evict()
        assert seq is not None  # every slot is taken: there is an entry to evict
        return seq

    def put(self, key: str, tokens: np.ndarray, seq: int, *, pinned: bool = False) -> CacheEntry:
        """Record that sequence ``seq`` holds ``tokens`` for ``key`` (replacing the key's previous entry)."""
        with self._lock:
            old = self._entries.get(key)
            path = old.path if old is not None and np.array_equal(old.tokens, tokens) else None
            entry = CacheEntry(key, np.array(tokens, dtype=np.int32), seq, path, pinned or bool(old and old.pinned))
            self._entries[key] = entry
            self.touch(entry)
            self.saves += 1
        return entry

    def evict(self) -> int | None:
        """Drop the least recently used entry from memory (the prefixes last); its sequence, or None when none."""
        with self._lock:
            resident = [e for e in self._entries.values() if e.seq is not None]
            if not resident:
                return None
            victim = min(resident, key=lambda e: (e.pinned, e.used))
            seq = victim.seq
            self._forget_seq(victim)
            self.evictions += 1
            return seq

    def add_disk(self, key: str, tokens: np.ndarray, path: Path) -> CacheEntry:
        """Register a state found on disk (its bytes are read when it is used)."""
        with self._lock:
            entry = CacheEntry(key, tokens, None, path, pinned=True)
            self._entries.setdefault(key, entry)
            return self._entries[key]

    def _forget_seq(self, entry: CacheEntry) -> None:
        entry.seq = None
        if entry.path is None:
            self._entries.pop(entry.key, None)

    def read(self, entry: CacheEntry) -> bytearray | None:
        """The bytes of an entry's file, read and verified (a bad file drops the entry)."""
        data = None
        if self.store is not None and entry.path is not None:
            data = self.store.read(entry.path, entry.key, entry.tokens)
        if data is None:
            entry.path = None  # the store deleted a bad file already
            self.discard(entry)
        return data

    def persist(self, entry: CacheEntry, state: Callable[[], bytearray | None]) -> bool:
        """Write an entry's state to disk, once (when there is a store): ``state()`` copies it out of llama.cpp
        only when the file is missing; otherwise the file is marked as just used. Whether it is on disk now."""
        if self.store is None:
            return False
        if entry.path is None or not entry.path.is_file():
            data = state()
            entry.path = self.store.write(entry.key, entry.tokens, data) if data else None
        else:
            _touch(entry.path)
        return entry.path is not None

    def discard(self, entry: CacheEntry) -> None:
        """Forget an entry, and delete its file (a state that could not be used)."""
        with self._lock:
            if self._entries.get(entry.key) is entry:
                del self._entries[entry.key]
        if entry.path is not None and self.store is not None:
            self.store.reject(entry.path, "refused")
            entry.path = None

    def scan_disk(self) -> list[CacheEntry]:
        """Register the valid state files of this model (newest first)."""
        if self.store is None:
            return []
        return [self.add_disk(key, tokens, path) for path, key, tokens, _n in self.store.scan()]

    def clear_memory(self) -> None:
        """Forget every sequence (the model is unloaded); the disk entries stay."""
        with self._lock:
            for entry in list(self._entries.values()):
                self._forget_seq(entry)

    def clear_disk(self) -> int:
        """Delete the state files and forget them."""
        with self._lock:
            for entry in list(self._entries.values()):
                entry.path = None
                if entry.seq is None:
                    del self._entries[entry.key]
        return delete_cache_dir(self.store.directory) if self.store is not None else 0

    def status(self) -> dict[str, Any]:
        """Counters for diagnostics."""
        with self._lock:
            entries = list(self._entries.values())
        store = self.store
        files = store.files() if store is not None else []
        return {
            "entries": sum(1 for e in entries if e.seq is not None),
            "tokens": sum(len(e.tokens) for e in entries if e.seq is not None),
            "max_entries": self.slots,
            "disk_entries": len(files),
            "disk_bytes": sum(_size(p) for p in files),
            "disk_rejected": store.rejected if store is not None else 0,
            "hits": self.hits,
            "misses": self.misses,
            "saves": self.saves,
            "restores": self.restores,
            "disk_restores": self.disk_restores,
            "evictions": self.evictions,
        }
