"""Only checkpoints rlgrid wrote are loaded: a DCP checkpoint is pickle underneath, so a changed
.metadata is refused before it is unpickled, and non-tensor entries load as plain data only."""
from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from services.common.config import load_config
from services.trainer.backends.fsdp import FSDPBackend
from services.trainer.checkpoint import (
    DIGEST_FIELD,
    KEY_ENV,
    CheckpointRefused,
    load_verified,
    metadata_digest,
)

CPU = torch.device("cpu")


class _Payload:
    """What an attacker pickles: unpickling it creates a directory (harmless stand-in for any code)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _params(backend) -> dict[str, torch.Tensor]:
    return {n: p.detach().to_local().clone() if hasattr(p, "to_local") else p.detach().clone()
            for n, p in backend.model.named_parameters()}


@pytest.fixture(scope="module")
def saved(tiny_model_dir, tmp_path_factory):
    cfg = load_config(overrides=[f"models.policy.load={tiny_model_dir}", "models.policy_trainer.dtype=float32"])
    backend = FSDPBackend(cfg, CPU)
    path = str(tmp_path_factory.mktemp("ckpt") / "checkpoint-1")
    backend.save_checkpoint(path, {"episode": 1})
    return backend, path


def _copy(src: str, dst) -> str:
    import shutil
    shutil.copytree(src, dst)
    return str(dst)


def test_a_changed_metadata_file_is_refused_before_it_is_unpickled(saved, tmp_path):
    backend, path = saved
    before, step = _params(backend), backend.step
    marker = str(tmp_path / "payload-ran")
    evil = _copy(path, tmp_path / "evil")
    with open(os.path.join(evil, ".metadata"), "wb") as f:
        pickle.dump(_Payload(marker), f)
    with pytest.raises(CheckpointRefused, match="does not match the digest"):
        backend.load_checkpoint(evil)
    assert not os.path.exists(marker), "the crafted .metadata was unpickled"
    # the same file with a digest the attacker recomputed without the trainer's key: refused when keyed
    meta_path = os.path.join(evil, "rlgrid_meta.json")
    meta = json.load(open(meta_path))
    json.dump({**meta, DIGEST_FIELD: metadata_digest(evil)}, open(meta_path, "w"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(KEY_ENV, "the-trainer's-key")
        with pytest.raises(CheckpointRefused, match=KEY_ENV):
            backend.load_checkpoint(evil)
    assert not os.path.exists(marker)
    assert backend.step == step and all(torch.equal(before[n], t) for n, t in _params(backend).items())


def test_a_checkpoint_without_a_digest_is_refused(saved, tmp_path):
    backend, path = saved
    old = _copy(path, tmp_path / "old")
    meta_path = os.path.join(old, "rlgrid_meta.json")
    meta = json.load(open(meta_path))
    del meta[DIGEST_FIELD]
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(CheckpointRefused, match="loads only checkpoints it wrote"):
        backend.load_checkpoint(old)


def test_the_digest_is_keyed_when_the_trainer_has_a_key(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "key-a")
    cfg = load_config(overrides=[f"models.policy.load={tiny_model_dir}", "models.policy_trainer.dtype=float32"])
    backend = FSDPBackend(cfg, CPU)
    backend.save_checkpoint(str(tmp_path / "c"), {"episode": 2})
    assert backend.load_checkpoint(str(tmp_path / "c")) == {"episode": 2}
    monkeypatch.setenv(KEY_ENV, "key-b")
    with pytest.raises(CheckpointRefused):
        backend.load_checkpoint(str(tmp_path / "c"))


def test_non_tensor_entries_load_as_plain_data_only(tmp_path):
    """Intact metadata, a pickle in a data file: DCP's own planner would run it, ours refuses it."""
    marker = str(tmp_path / "payload-ran")
    path = str(tmp_path / "dcp")
    dcp.save({"w": torch.ones(3), "evil": _Payload(marker)}, checkpoint_id=path)
    meta = {DIGEST_FIELD: metadata_digest(path)}
    with pytest.raises(CheckpointRefused, match="entry evil is not plain data"):
        load_verified({"w": torch.zeros(3), "evil": None}, path, meta)
    assert not os.path.exists(marker)
    # plain data loads, and the attack is real: the default planner runs the payload
    dcp.save({"w": torch.ones(3), "plain": {"lr": [0.1, 0.2], "step": 3}}, checkpoint_id=str(tmp_path / "ok"))
    state = {"w": torch.zeros(3), "plain": {"lr": [0.0, 0.0], "step": 0}}
    load_verified(state, str(tmp_path / "ok"), {DIGEST_FIELD: metadata_digest(str(tmp_path / "ok"))})
    assert state["plain"] == {"lr": [0.1, 0.2], "step": 3} and torch.equal(state["w"], torch.ones(3))
    dcp.load({"w": torch.zeros(3), "evil": None}, checkpoint_id=path, planner=DefaultLoadPlanner())
    assert os.path.isdir(marker)
