"""Runs that outlive their trainer or their coordinator.

Both restarts resume the run from its last checkpoint: the newest runs/<run_id>/checkpoint-<episode>
the trainer finished writing (its rlgrid_meta.json is written last), else the checkpoint the run itself
started from (runtime_args.resume_from), else the run's start. What the run did after that checkpoint
is redone: sampling is seeded per step and per prompt (never per replica or call, so fewer or other
replicas draw the same samples) and the data position is saved in the checkpoint, so the redone
steps generate the same samples and train on the same losses as a run that never stopped. Each episode
is trained on once in the run's history and none is skipped. The run's record follows: metrics.jsonl
drops the steps being redone, and an event names them (Run.rollback).

- A trainer lost mid-run (a call failed and it no longer answers for this run: it restarted, died, hung
  or lost its link): with runtime_args.trainer_restarts > 0 the run waits up to
  runtime_args.trainer_restart_wait_s for a trainer to register again (the same service restarted, or
  another one), sets it up and resumes; its rollout replicas stay in the run. Otherwise it fails.
- A coordinator restarted mid-run: its runs that were RUNNING or PAUSED resume (a PAUSED one pauses
  again at its first step boundary) once a trainer and a rollout replica have registered with it.
"""
from __future__ import annotations

import json
import os
import re
import time

from rlgrid.v1 import common_pb2 as pb
from rlgrid.v1 import coordinator_pb2 as cpb
from services.common.config import RLConfig
from services.coordinator.clients import StepError, TrainerClient
from services.coordinator.runs import Run, StopRequested
from services.coordinator.workers import WorkerRegistry

CHECKPOINT_META = "rlgrid_meta.json"   # written by the trainer after the checkpoint's data
_CHECKPOINT_DIR = re.compile(r"checkpoint-(\d+)")


def checkpoint_episode(path: str) -> int:
    """The episode a checkpoint was saved after (rlgrid_meta.json's `episode`, else its name)."""
    try:
        with open(os.path.join(path, CHECKPOINT_META)) as f:
            episode = json.load(f).get("episode")
        if isinstance(episode, int) and episode >= 0:
            return episode
    except (OSError, ValueError, AttributeError):
        pass
    match = _CHECKPOINT_DIR.fullmatch(os.path.basename(path.rstrip("/")))
    return int(match.group(1)) if match else 0


def last_checkpoint(run_dir: str) -> str | None:
    """The newest complete checkpoint-<episode> directory of a run, or None."""
    try:
        names = os.listdir(run_dir)
    except OSError:
        return None
    done = [(int(m.group(1)), name) for name in names if (m := _CHECKPOINT_DIR.fullmatch(name))
            and os.path.isfile(os.path.join(run_dir, name, CHECKPOINT_META))]
    return os.path.join(run_dir, max(done)[1]) if done else None


def resume_point(run: Run, started_from: str) -> tuple[str, int]:
    """(checkpoint to resume from, or "" for the start; its episode). `started_from`: the run's own
    runtime_args.resume_from."""
    path = last_checkpoint(run.run_dir) or started_from
    return (path, checkpoint_episode(path)) if path else ("", 0)


def redone_steps(episode: int, step: int) -> str:
    """What a rollback from `step` to `episode` redoes, as an event says it."""
    if step <= episode:
        return ""
    return f"; step {step} is redone" if step == episode + 1 else f"; steps {episode + 1}-{step} are redone"


def trainer_lost(trainer: TrainerClient, run_id: str) -> str | None:
    """Why the trainer no longer serves this run (it does not answer, or answers for no run: it
    restarted), or None when it still does (the failure was something else)."""
    try:
        info = trainer.call("GetInfo", pb.Empty())
    except StepError as exc:
        return str(exc)
    if info.run_id != run_id:
        return f"{trainer.name} is no longer set up for this run (it restarted)"
    return None


class TrainerRecovery:
    """The trainer restarts a run may still make (runtime_args.trainer_restarts)."""

    def __init__(self, run: Run, cfg: RLConfig, workers: WorkerRegistry):
        ra = cfg.runtime_args
        self.run, self.cfg, self.workers = run, cfg, workers
        self.left, self.started_from = ra.trainer_restarts, ra.resume_from

    def recover(self, failure: StepError, trainer: TrainerClient) -> str:
        """After `failure`: the address of a trainer to resume on, with cfg.runtime_args.resume_from set
        to the checkpoint to resume from and the run rolled back to it. Re-raises `failure` when the
        trainer still serves the run (the failure was not its loss) or no restart is left."""
        if self.left <= 0:
            raise failure
        why = trainer_lost(trainer, self.run.run_id)
        if why is None:
            raise failure
        self.left -= 1
        lost_at = time.monotonic()
        ra = self.cfg.runtime_args
        checkpoint, episode = resume_point(self.run, self.started_from)
        ra.resume_from = checkpoint
        redone = redone_steps(episode, self.run.step)
        self.run.rollback(episode, f"trainer lost: {why}. The run resumes from {checkpoint or 'its start'} (episode "
                                   f"{episode}){redone} once a trainer registers (waiting up to "
                                   f"runtime_args.trainer_restart_wait_s={ra.trainer_restart_wait_s:g} s; "
                                   f"{self.left} restarts left, runtime_args.trainer_restarts)")
        return self._wait(lost_at, why)

    def _wait(self, since: float, why: str) -> str:
        """A trainer that registered after `since` and answers a health check."""
        deadline = since + self.cfg.runtime_args.trainer_restart_wait_s
        while time.monotonic() < deadline:
            if self.run.stop_requested:
                raise StopRequested()
            for worker in self.workers.serving(cpb.TRAINER, timeout=self.cfg.runtime_args.rpc_timeout_s.control):
                seen = self.workers.registered_at(worker.address)
                if seen is not None and seen > since:
                    self.run.log(f"trainer {worker.address} registered: resuming the run on it")
                    return worker.address
            time.sleep(0.5)
        raise StepError(f"the trainer was lost ({why}) and none registered within "
                        f"runtime_args.trainer_restart_wait_s={self.cfg.runtime_args.trainer_restart_wait_s:g} s")
