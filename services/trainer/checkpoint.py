"""Loading only checkpoints rlgrid wrote.

A torch DCP checkpoint is pickle underneath: `dcp.load` unpickles its `.metadata` file, and its
non-tensor entries (the LR schedule's state, for instance) are read with `torch.load(...,
weights_only=False)`, so a crafted checkpoint runs code in the trainer. Two guards:

* `rlgrid_meta.json` records an HMAC-SHA256 of `.metadata` (keyed by RLGRID_CHECKPOINT_KEY when the
  trainer has one, else unkeyed), and `VerifiedReader` unpickles exactly the bytes it verified;
  a mismatch, or a checkpoint without the digest, is refused.
* `SafeLoadPlanner` reads the non-tensor entries with `weights_only=True` (plain numbers, strings,
  lists and dicts: what rlgrid's state holds), so the data files cannot smuggle code either.

Without a key the digest proves the metadata is the one written beside rlgrid_meta.json, not who
wrote them: set RLGRID_CHECKPOINT_KEY on the trainer where others can write to its output root.
"""
from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import pickle

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException, FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

KEY_ENV = "RLGRID_CHECKPOINT_KEY"
META_FILE = "rlgrid_meta.json"
DIGEST_FIELD = "metadata_hmac_sha256"
_DCP_METADATA = ".metadata"


class CheckpointRefused(ValueError):
    """The directory is not a checkpoint this trainer may load."""


def _digest(data: bytes) -> str:
    return hmac.new(os.environ.get(KEY_ENV, "").encode(), data, hashlib.sha256).hexdigest()


def metadata_digest(path: str) -> str:
    """The digest of `path`'s DCP metadata file, as recorded in rlgrid_meta.json at save time."""
    with open(os.path.join(path, _DCP_METADATA), "rb") as f:
        return _digest(f.read())


def verified_metadata(path: str, meta: dict) -> bytes:
    """The bytes of `path`'s .metadata when they match the digest in `meta`; else CheckpointRefused."""
    recorded = meta.get(DIGEST_FIELD)
    if not isinstance(recorded, str):
        raise CheckpointRefused(f"the checkpoint has no {DIGEST_FIELD} in {META_FILE}: rlgrid loads only checkpoints "
                                f"it wrote (a DCP checkpoint is pickle underneath)")
    try:
        with open(os.path.join(path, _DCP_METADATA), "rb") as f:
            data = f.read()
    except OSError:
        raise CheckpointRefused(f"the checkpoint has no readable {_DCP_METADATA} file") from None
    if not hmac.compare_digest(_digest(data), recorded):
        raise CheckpointRefused(f"the checkpoint's {_DCP_METADATA} does not match the digest in {META_FILE}: it was "
                                f"changed after rlgrid wrote it, or written with another {KEY_ENV}; refused")
    return data


class VerifiedReader(FileSystemReader):
    """DCP's file reader, except that .metadata is unpickled only from bytes matching the recorded digest."""

    def __init__(self, path: str, meta: dict):
        super().__init__(path)
        self._meta = meta
        self._dir = path

    def read_metadata(self) -> Metadata:   # no rank-local fallback: only the verified global metadata
        metadata = pickle.loads(verified_metadata(self._dir, self._meta))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """Reads non-tensor entries with weights_only=True (DCP's default planner unpickles them freely)."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            safe = torch.load(value, weights_only=True)   # refuses anything but plain data
        except pickle.UnpicklingError:
            raise CheckpointRefused(f"the checkpoint's entry {read_item.dest_index.fqn} is not plain data (numbers, "
                                    f"strings, lists, dicts): refused (a DCP checkpoint is pickle underneath)") from None
        # hand DCP's own placement the same value, re-serialised by us: it unpickles only what we wrote
        clean = io.BytesIO()
        torch.save(safe, clean)
        clean.seek(0)
        super().load_bytes(read_item, clean)


def load_verified(state: dict, path: str, meta: dict) -> None:
    """dcp.load of an rlgrid checkpoint into `state` (resharded as DCP does), with both guards. A refusal
    raises CheckpointRefused (DCP would wrap it in its CheckpointException, a BaseException)."""
    try:
        dcp.load(state, storage_reader=VerifiedReader(path, meta), planner=SafeLoadPlanner())
    except CheckpointException as exc:
        refused = [e for e, _ in exc.failures.values() if isinstance(e, CheckpointRefused)]
        if refused:
            raise refused[0] from None
        raise RuntimeError(f"loading the checkpoint failed: {exc}") from None


def write_meta(path: str, meta: dict) -> None:
    """rlgrid_meta.json beside a DCP checkpoint just written: `meta` plus the digest of its .metadata."""
    with open(os.path.join(path, META_FILE), "w") as f:
        json.dump({**meta, DIGEST_FIELD: metadata_digest(path)}, f)


def read_meta(path: str) -> dict:
    """rlgrid_meta.json of a checkpoint (plain JSON; nothing in it is unpickled)."""
    try:
        with open(os.path.join(path, META_FILE)) as f:
            meta = json.load(f)
    except OSError:
        raise CheckpointRefused(f"not an rlgrid checkpoint (no readable {META_FILE})") from None
    except ValueError:
        raise CheckpointRefused(f"{META_FILE} is not valid JSON") from None
    if not isinstance(meta, dict):
        raise CheckpointRefused(f"{META_FILE} is not a JSON object")
    return meta


def verified_reader(path: str) -> VerifiedReader:
    """A DCP reader of `path` that unpickles only the .metadata its rlgrid_meta.json vouches for."""
    meta = read_meta(path)
    verified_metadata(path, meta)
    return VerifiedReader(path, meta)


def save(path: str, state: dict, meta: dict, device: torch.device) -> None:
    """Every rank: `state` through DCP, and this rank's RNG; rank 0 then writes rlgrid_meta.json with `meta`
    and the digest that lets `load` refuse a .metadata rlgrid did not write."""
    dcp.save(state, checkpoint_id=path)
    rng = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    torch.save(rng, os.path.join(path, f"rng-rank{dist.get_rank()}.pt"))
    if dist.get_rank() == 0:
        write_meta(path, meta)


def load(path: str, state: dict, device: torch.device, backend: str) -> dict:
    """Every rank: fills `state` from an rlgrid checkpoint of `backend` (resharded as DCP does) after both
    guards, restores this rank's RNG (a rank the saving run did not have keeps its own), and returns
    rlgrid_meta.json's fields without the digest and the backend."""
    meta = read_meta(path)
    saved_by = meta.get("backend", "fsdp")   # checkpoints from before the field are FSDP's
    if saved_by != backend:
        raise CheckpointRefused(f"the checkpoint was saved by models.policy_trainer.backend={saved_by}; resume it "
                                f"with that backend (models.policy_trainer.backend={backend} now), or convert it")
    verified_metadata(path, meta)   # refused before any state is touched
    load_verified(state, path, meta)
    rng_path = os.path.join(path, f"rng-rank{dist.get_rank()}.pt")
    if os.path.isfile(rng_path):
        rng = torch.load(rng_path, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], device)
    meta.pop(DIGEST_FIELD)
    meta.pop("backend", None)
    return meta
