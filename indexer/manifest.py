"""The manifest: one immutable JSON file per committed index version.

A manifest names the model whose codes the index holds (`ModelMeta`), the
shard count, and per shard the segment files (`SegmentRef`, with row count,
size and sha256) and the tombstoned face ids. Layout and rules live in
docs/index-format.md; this module is the code side of that contract.

Segment paths are validated on load: a manifest can only point inside the
index root (`shards/...`), never at `..` or an absolute path, so a hostile or
corrupt manifest cannot make a reader open arbitrary files.
"""
from __future__ import annotations

import json
import posixpath
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone

from facepq_core.errors import ConfigError, FacepqError, IndexFormatError
from facepq_core.partition import PartitionRef
from facepq_core.refine import RefineTier

# 2: the model section names its codec (and no longer stores `packed`, derived from K).
# 3: the model section may name a refinement tier (`refine`); written only by indexes that have one,
#    so readers of format 2 keep reading every index without a tier.
# 4: the model section may name a cell partition (`partition`, facepq_core.partition); written only by
#    partitioned indexes, so every other index keeps its format (and older readers keep reading it).
FORMAT_VERSION = 4
_SEGMENT_ID = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._-]{0,127}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def utc_now() -> str:
    """Current UTC time as ISO-8601 with a Z suffix (the format of `created_at`)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_utc(text: str) -> datetime:
    """Inverse of `utc_now` (also accepts seconds without a fraction)."""
    for fmt in ("%Y-%m-%dT%H:%M:%S.%fZ", "%Y-%m-%dT%H:%M:%SZ"):
        try:
            return datetime.strptime(text, fmt).replace(tzinfo=timezone.utc)
        except ValueError:
            continue
    raise IndexFormatError(f"bad created_at timestamp {text!r} in manifest")


def check_relative_path(path: str) -> str:
    """Return `path` if it is a safe relative path inside the index root, else raise IndexFormatError."""
    if not isinstance(path, str) or not path:
        raise IndexFormatError(f"segment path {path!r} is not a non-empty string")
    if "\\" in path or "\0" in path or path.startswith("/") or re.match(r"^[A-Za-z]+:", path):
        raise IndexFormatError(f"segment path {path!r} must be relative to the index root")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts) or posixpath.normpath(path) != path:
        raise IndexFormatError(f"segment path {path!r} leaves the index root or is not normalised; refusing it")
    return path


@dataclass(frozen=True)
class ModelMeta:
    """The model an index's codes were made with; every commit must match it.

    Args:
        fingerprint: hex id of the model (config + weights; see opqn_model.checkpoint).
        trunk: trunk registry name ('dlib', 'resnet20', ...).
        M, K, bits, code_bytes: the code layout (`facepq_core.codes.CodeSpec`; nibble-packed when K <= 16).
        codec: the registered code type (`facepq_core.codecs`): what the codes mean and which scan
            kernel family serves them. Manifests of format 1 predate codecs: their codes are 'opqn'.
        refine: the refinement tier stored beside the codes (facepq_core.refine), None for codes only.
        partition: the index's cell partition (facepq_core.partition), None for exhaustive only. Chosen when
            the index is created; segments keep their rows grouped by its cells.
    """

    fingerprint: str
    trunk: str
    M: int
    K: int
    bits: int
    code_bytes: int
    codec: str = "opqn"
    refine: RefineTier | None = None
    partition: PartitionRef | None = None

    @classmethod
    def from_code_spec(cls, spec, fingerprint: str, trunk: str, codec: str = "opqn",
                       refine: RefineTier | None = None) -> "ModelMeta":
        """Build from an `facepq_core.codes.CodeSpec` plus the model's fingerprint, trunk and codec names."""
        return cls(fingerprint=str(fingerprint), trunk=str(trunk), M=spec.M, K=spec.K, bits=spec.bits,
                   code_bytes=spec.code_bytes, codec=str(codec), refine=refine)

    @classmethod
    def from_encoder(cls, encoder, refine: RefineTier | None = None) -> "ModelMeta":
        """Build from a loaded `opqn_model.api.FaceEncoder` (and the index's refinement tier, if any)."""
        return cls.from_code_spec(encoder.codec.spec, encoder.fingerprint, encoder.trunk_name, encoder.codec.name,
                                  refine)

    def code_spec(self):
        from facepq_core.codes import CodeSpec

        return CodeSpec(M=self.M, K=self.K)

    @property
    def packed(self) -> bool:
        """Two sub-codes per byte (K <= 16): derived from the layout, never stored."""
        return self.code_spec().packed

    def to_dict(self) -> dict:
        out = {"fingerprint": self.fingerprint, "trunk": self.trunk, "codec": self.codec, "M": self.M, "K": self.K,
               "bits": self.bits, "code_bytes": self.code_bytes}
        if self.refine is not None:
            out["refine"] = self.refine.to_dict()
        if self.partition is not None:
            out["partition"] = self.partition.to_dict()
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "ModelMeta":
        try:
            names = {k: d[k] for k in ("fingerprint", "trunk")} | {"codec": d.get("codec", "opqn")}
            if not all(isinstance(v, str) for v in names.values()):
                raise TypeError(f"fingerprint, trunk and codec must be strings, got {names!r}")
            refine = RefineTier.from_dict(d["refine"]) if d.get("refine") is not None else None
            partition = PartitionRef.from_dict(d["partition"]) if d.get("partition") is not None else None
            meta = cls(M=int(d["M"]), K=int(d["K"]), bits=int(d["bits"]), code_bytes=int(d["code_bytes"]),
                       refine=refine, partition=partition, **names)
        except IndexFormatError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError, ConfigError) as exc:
            raise IndexFormatError(f"manifest 'model' section is incomplete or malformed: {exc!r}"[:300]) from None
        try:
            spec = meta.code_spec()
        except FacepqError as exc:
            raise IndexFormatError(f"manifest 'model' section has an impossible code layout: {exc}") from exc
        if (spec.bits, spec.code_bytes) != (meta.bits, meta.code_bytes):
            raise IndexFormatError(f"manifest 'model' section: M={meta.M}, K={meta.K} give {spec.bits} bits in "
                                   f"{spec.code_bytes} bytes, not {meta.bits} in {meta.code_bytes}")
        return meta

    def mismatch(self, other: "ModelMeta") -> str | None:
        """None when `other` makes codes compatible with this index, else a sentence naming both models."""
        if self.fingerprint != other.fingerprint:
            return (f"the index holds codes of model {self.fingerprint} (trunk {self.trunk}, codec {self.codec}, "
                    f"M={self.M}, K={self.K}) but this model is {other.fingerprint} (trunk {other.trunk}, codec "
                    f"{other.codec}, M={other.M}, K={other.K}); codes of different models cannot be mixed: use the "
                    f"index's model or a new index")
        if (self.codec, self.M, self.K, self.code_bytes) != (other.codec, other.M, other.K, other.code_bytes):
            return (f"code shape differs: index codec {self.codec} M={self.M} K={self.K} code_bytes={self.code_bytes}, "
                    f"model codec {other.codec} M={other.M} K={other.K} code_bytes={other.code_bytes}")
        if self.refine != other.refine:
            def name(tier):
                return tier.kind if tier else "none"
            return (f"the index stores refinement tier {name(self.refine)} beside its codes, this writer "
                    f"{name(other.refine)}; an index keeps the tier it was created with (--refine "
                    f"{name(self.refine)}, or a new index)")
        if self.partition != other.partition:
            def cells(ref):
                return f"{ref.cells} cells ({ref.sha256[:12]})" if ref else "no cell partition"
            return (f"the index has {cells(self.partition)}, this writer {cells(other.partition)}; an index keeps "
                    f"the partition it was created with (--cells, or a new index)")
        return None

    @property
    def format_version(self) -> int:
        """The manifest format an index of this model is written in: 4 with a partition, 3 with a refinement
        tier, else 2 (each reader reads every older format)."""
        if self.partition is not None:
            return 4
        return 3 if self.refine is not None else 2


@dataclass(frozen=True)
class SegmentRef:
    """One immutable segment file: `path` is relative to the index root."""

    id: str
    path: str
    rows: int
    bytes: int
    sha256: str

    def to_dict(self) -> dict:
        return {"id": self.id, "path": self.path, "rows": self.rows, "bytes": self.bytes, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, d: dict) -> "SegmentRef":
        try:
            ref = cls(id=str(d["id"]), path=str(d["path"]), rows=int(d["rows"]), bytes=int(d["bytes"]),
                      sha256=str(d["sha256"]))
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise IndexFormatError(f"malformed segment entry in manifest: {exc!r}"[:300]) from None
        if not _SEGMENT_ID.match(ref.id):
            raise IndexFormatError(f"bad segment id {ref.id!r} in manifest")
        check_relative_path(ref.path)
        if not ref.path.startswith("shards/"):
            raise IndexFormatError(f"segment path {ref.path!r} is not under shards/; refusing it")
        if ref.rows < 0 or ref.bytes < 0 or not _SHA256.match(ref.sha256):
            raise IndexFormatError(f"segment {ref.id}: bad rows/bytes/sha256 in manifest")
        return ref


@dataclass
class ShardState:
    """Segments of one shard plus face ids deleted from them but not yet compacted away."""

    segments: list[SegmentRef] = field(default_factory=list)
    tombstones: set[int] = field(default_factory=set)

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.segments)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.segments)


@dataclass
class Manifest:
    """One committed version of an index (see docs/index-format.md)."""

    version: int
    model: ModelMeta
    shard_count: int
    shards: list[ShardState]
    parent_version: int | None = None
    created_at: str = field(default_factory=utc_now)
    message: str = ""
    format_version: int = FORMAT_VERSION
    # How the codes were made beyond the model, e.g. database-side augmentation (indexer.dba): {"kind": "dba",
    # "k", "alpha", "faces", "stale"}; None: plain codes. Advisory (a reader that ignores it serves the same codes).
    augmentation: dict | None = None

    @classmethod
    def empty(cls, model: ModelMeta, shard_count: int) -> "Manifest":
        """Version 0: the state before the first commit (never written to disk)."""
        if shard_count < 1:
            raise IndexFormatError(f"shard count must be >= 1, got {shard_count}")
        return cls(version=0, model=model, shard_count=shard_count, shards=[ShardState() for _ in range(shard_count)],
                   format_version=model.format_version)

    # ---- derived numbers -------------------------------------------------
    @property
    def segments(self) -> list[SegmentRef]:
        return [s for shard in self.shards for s in shard.segments]

    @property
    def rows(self) -> int:
        return sum(sh.rows for sh in self.shards)

    @property
    def tombstone_count(self) -> int:
        return sum(len(sh.tombstones) for sh in self.shards)

    @property
    def live_faces(self) -> int:
        """Rows minus tombstoned rows (a tombstone always names a row present in its shard)."""
        return self.rows - self.tombstone_count

    @property
    def bytes(self) -> int:
        return sum(sh.bytes for sh in self.shards)

    def check_compatible(self, model: ModelMeta, shard_count: int | None, uri: str) -> None:
        """Refuse codes of `model`, sharded `shard_count` ways (None: the index's count), for this index.

        Raises:
            IndexFormatError: another model or code shape (`ModelMeta.mismatch`).
            ConfigError: another shard count (fixed when the index was created).
        """
        problem = self.model.mismatch(model)
        if problem:
            raise IndexFormatError(f"refusing to commit into {uri}: {problem}")
        if shard_count is not None and shard_count != self.shard_count:
            raise ConfigError(f"{uri} has {self.shard_count} shards (fixed when it was created); "
                              f"got shard count {shard_count}")

    # ---- (de)serialisation -----------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format_version": self.format_version,
            "version": self.version,
            "parent_version": self.parent_version,
            "created_at": self.created_at,
            "model": self.model.to_dict(),
            "shard_count": self.shard_count,
            "shards": [{"shard": i, "segments": [s.to_dict() for s in sh.segments],
                        "tombstones": sorted(sh.tombstones)} for i, sh in enumerate(self.shards)],
            "message": self.message,
            **({"augmentation": dict(self.augmentation)} if self.augmentation is not None else {}),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, source: str = "manifest") -> "Manifest":
        """Parse and validate a manifest; anything wrong with it is an IndexFormatError, never another kind.

        Valid JSON of the wrong shape (a number where a list belongs, a list where a string belongs, a
        row count of 1e400, nesting thousands deep) must not escape as TypeError, OverflowError or
        RecursionError: a CLI would print a traceback and a node's watcher thread would die.
        """
        try:
            d = json.loads(text)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise IndexFormatError(f"{source} is not valid JSON (corrupt, truncated or nested too deep): "
                                   f"{str(exc)[:200]}") from None
        if not isinstance(d, dict):
            raise IndexFormatError(f"{source} is not a JSON object")
        try:
            return cls.from_dict(d, source)
        except IndexFormatError:
            raise
        except (TypeError, ValueError, AttributeError, KeyError, OverflowError, RecursionError) as exc:
            raise IndexFormatError(f"{source} is malformed (a field of the wrong type or size): "
                                   f"{type(exc).__name__}: {str(exc)[:200]}") from None

    @classmethod
    def from_dict(cls, d: dict, source: str = "manifest") -> "Manifest":
        fmt = d.get("format_version")
        if not isinstance(fmt, int):
            raise IndexFormatError(f"{source} has no integer format_version; not a facepq index manifest")
        if fmt > FORMAT_VERSION:
            raise IndexFormatError(f"{source} has index format_version {fmt} but this facepq reads up to "
                                   f"{FORMAT_VERSION}; upgrade facepq to read this index")
        try:
            shard_count = int(d["shard_count"])
            shards_raw = d["shards"]
            version = int(d["version"])
        except (KeyError, TypeError, ValueError) as exc:
            raise IndexFormatError(f"{source} is missing version/shard_count/shards: {exc!r}") from exc
        if shard_count < 1 or not isinstance(shards_raw, list) or len(shards_raw) != shard_count:
            raise IndexFormatError(f"{source}: shard_count {shard_count} does not match its {len(shards_raw)} shards")
        shards: list[ShardState] = []
        for i, sh in enumerate(shards_raw):
            if not isinstance(sh, dict) or sh.get("shard") != i:
                raise IndexFormatError(f"{source}: shard entry {i} is malformed or out of order")
            try:
                tombstones = {int(t) for t in sh.get("tombstones", [])}
            except (TypeError, ValueError) as exc:
                raise IndexFormatError(f"{source}: shard {i} has non-integer tombstones") from exc
            shards.append(ShardState(segments=[SegmentRef.from_dict(s) for s in sh.get("segments", [])],
                                     tombstones=tombstones))
        parent = d.get("parent_version")
        return cls(version=version, model=ModelMeta.from_dict(d.get("model") or {}), shard_count=shard_count,
                   shards=shards, parent_version=None if parent is None else int(parent),
                   created_at=str(d.get("created_at", "")), message=str(d.get("message", "")), format_version=fmt,
                   augmentation=dict(d["augmentation"]) if isinstance(d.get("augmentation"), dict) else None)

    def successor(self, message: str) -> "Manifest":
        """A deep copy with version + 1, this version as parent, fresh timestamp and `message`."""
        return Manifest(version=self.version + 1, model=self.model, shard_count=self.shard_count,
                        shards=[ShardState(list(sh.segments), set(sh.tombstones)) for sh in self.shards],
                        parent_version=self.version if self.version > 0 else None, message=message,
                        format_version=self.model.format_version,
                        augmentation=None if self.augmentation is None else dict(self.augmentation))

    def mark_augmentation_stale(self) -> None:
        """The gallery changed after its augmentation was computed (faces added or deleted change neighbours)."""
        if self.augmentation is not None:
            self.augmentation["stale"] = True
