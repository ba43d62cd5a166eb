"""The quantized host store as a file: quantize once, map it at every later attach.

Quantizing is the slow part of attaching with `weight_quant` (int4's code search reads the bf16
weights at well under a GB/s); its result depends only on the weights and the settings. So the
packed units are written to `<cache>/stores/<key>.store` with a manifest `<key>.json`, and a
later attach whose key matches maps that file instead of quantizing.

The key is a hash over the format version, the store kind, the quantization settings, and every
unit's tensors: names, dtypes, shapes and **their full contents** (xxh3-128, which reads at
memory speed). Keyed by content, a store can never stand in for other weights -- a checkpoint
edited on disk, a model changed in memory after loading, another model with the same shapes. A
store that is truncated, hand-edited or from another format is found by its manifest (sizes and
an xxh3 of every unit's bytes, checked when it is opened), said in one log line, and rebuilt.

Writing goes to a temporary name and is renamed only when complete (the manifest last): a full
disk or a crash leaves no partial store, only a log line saying this attach was not cached.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from .cache_paths import cache_root
from .os_memory import read_randomly, release_pages

log = logging.getLogger(__name__)

#: Bump when the file layout or the quantizers' codes change: older stores then no longer match.
FORMAT = 1
#: Units start on page boundaries, so a mapped unit is page-aligned like an allocated buffer.
PAGE = 4096


def stores_dir() -> Path:
    """`stores/` under the cache root (`cache_paths.cache_root`)."""
    return cache_root() / "stores"


def store_directory(store_cache: str) -> Path:
    """The directory `TorusConfig.store_cache` names ("auto": `stores_dir()`)."""
    return stores_dir() if store_cache == "auto" else Path(store_cache).expanduser()


def _bytes_of(t: torch.Tensor) -> memoryview:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return memoryview(t.contiguous().view(torch.uint8).reshape(-1).numpy())


def _digest(t: torch.Tensor) -> str:
    import xxhash

    return xxhash.xxh3_128_hexdigest(_bytes_of(t))


def _round_up(n: int) -> int:
    return -(-n // PAGE) * PAGE


def store_key(kind: str, quant: str, group_size: int, units: Iterable[Sequence[tuple[str, torch.Tensor]]]) -> str:
    """The key of a store of `units` (each unit's source tensors as the store packs them, in
    order; consumed once, so a caller can free each unit after it): format, settings, and every
    tensor's name, dtype, shape and full contents."""
    h = hashlib.sha256()
    h.update(json.dumps([FORMAT, kind, quant, group_size]).encode())
    for unit in units:
        for name, t in unit:
            h.update(json.dumps([name, str(t.dtype), list(t.shape), _digest(t)]).encode())
            release_pages(t)  # a mapped checkpoint's pages, read for the key: not kept (os_memory)
    return h.hexdigest()[:40]


class StoreFile:
    """One store's file: found (`open`) and read unit by unit, or written as units are packed.

    key: `store_key` of the store's units; what: how log lines name it, e.g. "the int4 FFN store".
    """

    def __init__(self, directory: Path, key: str, what: str) -> None:
        self.what = what
        self.key = key
        self.directory = Path(directory)
        self.path = self.directory / f"{self.key}.store"
        self.manifest_path = self.directory / f"{self.key}.json"
        self._mapped: torch.Tensor | None = None
        self._entries: list[dict[str, Any]] = []
        self._writer: Any = None
        self._tmp: Path | None = None
        self._offset = 0
        self.committed = False  # the written store was published

    # ------------------------------------------------------------------ reading
    def open(self, nbytes: Sequence[int]) -> bool:
        """Map the store if a complete, intact one for this key exists (its units of `nbytes`
        bytes each); else say why in one log line, remove what is there, and return False."""
        if not self.manifest_path.exists():
            if self.path.exists():
                self._discard("it has no manifest (an interrupted write)")
            return False
        try:
            manifest = json.loads(self.manifest_path.read_text())
            entries = manifest["units"]
            problem = None
            if manifest.get("format") != FORMAT or manifest.get("key") != self.key:
                problem = f"it was written by format {manifest.get('format')}, this is {FORMAT}"
            elif [e["nbytes"] for e in entries] != list(nbytes):
                problem = "its units' sizes differ from this model's"
            elif not self.path.exists() or self.path.stat().st_size != manifest["size"]:
                size = self.path.stat().st_size if self.path.exists() else 0
                problem = f"the file holds {size} bytes, its manifest says {manifest['size']} (truncated?)"
        except (OSError, ValueError, KeyError, TypeError) as exc:
            problem = f"its manifest cannot be read ({exc})"
        if problem is None:
            import xxhash

            mapped = torch.from_file(str(self.path), shared=False, size=manifest["size"], dtype=torch.uint8)
            for i, e in enumerate(entries):
                unit = mapped[e["offset"] : e["offset"] + e["nbytes"]]
                if xxhash.xxh3_128_hexdigest(_bytes_of(unit)) != e["xxh3"]:
                    problem = f"unit {i}'s bytes do not match their checksum (corrupt)"
                    break
            else:
                read_randomly(mapped)  # no read-around: units are read in the model's order, not the file's
                self._mapped, self._entries = mapped, entries
                log.info("torus-sparse: %s maps %s (quantized once, not again)", self.what, self.path)
                return True
            del mapped
        self._discard(problem)
        return False

    @property
    def mapped(self) -> torch.Tensor | None:
        """The whole mapped file (None until `open` matched or `map_written`)."""
        return self._mapped

    def unit(self, i: int) -> torch.Tensor:
        """Unit `i`'s bytes in the mapped file (file-backed pages: the OS reads them on first use)."""
        assert self._mapped is not None
        e = self._entries[i]
        return self._mapped[e["offset"] : e["offset"] + e["nbytes"]]

    def _discard(self, why: str) -> None:
        log.warning(
            "torus-sparse: %s at %s is not used: %s; quantizing again and rewriting it", self.what, self.path, why
        )
        for p in (self.manifest_path, self.path):
            p.unlink(missing_ok=True)

    # ------------------------------------------------------------------ writing
    def append(self, buffer: torch.Tensor) -> None:
        """Write the next unit's bytes (page-aligned); a failure stops writing, never attaching."""
        if self._writer is False:
            return
        try:
            if self._writer is None:
                self.directory.mkdir(parents=True, exist_ok=True)
                self._tmp = self.directory / f"{self.key}.store.tmp-{os.getpid()}"
                self._writer = open(self._tmp, "wb")
            data = _bytes_of(buffer)
            self._writer.seek(self._offset)
            self._writer.write(data)
            self._entries.append({"offset": self._offset, "nbytes": len(data), "xxh3": _digest(buffer)})
            self._offset = _round_up(self._offset + len(data))
        except OSError as exc:
            self._fail(exc)

    def commit(self) -> None:
        """Publish the written store: the data under its name, then the manifest (the marker
        that it is complete)."""
        if not self._writer:
            return
        try:
            self._writer.truncate(self._offset)
            self._writer.flush()
            os.fsync(self._writer.fileno())
            self._writer.close()
            manifest = {"format": FORMAT, "key": self.key, "size": self._offset, "units": self._entries}
            tmp_manifest = self.manifest_path.with_name(self.manifest_path.name + f".tmp-{os.getpid()}")
            tmp_manifest.write_text(json.dumps(manifest))
            os.replace(self._tmp, self.path)  # type: ignore[arg-type]
            os.replace(tmp_manifest, self.manifest_path)
            log.info(
                "torus-sparse: %s written to %s (%d bytes); later attaches map it", self.what, self.path, self._offset
            )
            self.committed = True
        except OSError as exc:
            self._fail(exc)
            self.manifest_path.with_name(self.manifest_path.name + f".tmp-{os.getpid()}").unlink(missing_ok=True)
            self.path.unlink(missing_ok=True)
        self._writer = False

    @property
    def failed(self) -> bool:
        """Writing stopped on an error (logged): the store is not (and will not be) on disk."""
        return self._writer is False and not self.committed

    def map_written(self) -> None:
        """Map the store this object just wrote and committed (no checksum pass: its bytes were
        hashed as they were written), so `unit` reads from the file."""
        assert self.committed
        if hasattr(os, "posix_fadvise"):
            # The pages just written sit in the page cache: hand them back, so the disk tier's budget
            # (not the write) decides what stays in memory.
            fd = os.open(self.path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        self._mapped = torch.from_file(str(self.path), shared=False, size=self._offset, dtype=torch.uint8)
        read_randomly(self._mapped)  # the disk tier reads ahead itself, unit by unit

    def _fail(self, exc: OSError) -> None:
        log.error(
            "torus-sparse: cannot write %s to %s (%s): this attach is not cached; free space there, "
            "set TORUS_SPARSE_CACHE elsewhere, or pass store_cache=None",
            self.what,
            self.directory,
            exc.strerror or exc,
        )
        if self._writer:
            try:
                self._writer.close()
            except OSError:
                pass
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
        self._writer = False
