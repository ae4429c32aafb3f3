"""The coordinator service: the user's API (grpcurl-friendly), the worker registry, and a scheduler
that runs one run at a time on the registered workers.

    python -m services.coordinator --port 50050 --state-dir ./output/coordinator

Paths a client names stay inside --config-dir / --output-root / --data-root / --model-root, and the
server binds loopback unless told otherwise (docs/security.md).
"""
from __future__ import annotations

import argparse
import logging
import os
import queue
import threading

import grpc

from rlgrid.v1 import common_pb2 as pb
from rlgrid.v1 import coordinator_pb2 as cpb
from rlgrid.v1 import coordinator_pb2_grpc
from services.common.config import RLConfig, config_to_yaml, load_config
from services.common.logs import setup_logging
from services.common.models import load_tokenizer
from services.common.paths import add_root_args, roots_from_args
from services.common.rpc import (
    DEFAULT_MAX_MESSAGE_MB,
    FailedPrecondition,
    InsecureServer,
    InvalidArgument,
    NotFound,
    Server,
    add_server_args,
    handle_errors,
    server_options,
)
from services.common.security import Transport, add_security_args, transport_from_args
from services.common.weight_sync import Rendezvous
from services.coordinator import metrics
from services.coordinator.clients import RolloutPool, StepError, TrainerClient
from services.coordinator.confine import DEFAULT_CONFIG_DIR, RunRoots, confine_run, read_config
from services.coordinator.loop import RunContext, run_grpo
from services.coordinator.membership import Membership
from services.coordinator.recovery import TrainerRecovery, redone_steps, resume_point
from services.coordinator.reward_pool import RewardPool
from services.coordinator.runs import TERMINAL, Run, RunStore, StopRequested
from services.coordinator.sync import WeightSync
from services.coordinator.workers import WorkerRegistry

log = logging.getLogger("coordinator")


class Scheduler:
    """Runs pending runs one after another once a trainer and a rollout replica are registered."""

    def __init__(self, store: RunStore, workers: WorkerRegistry, rendezvous: Rendezvous, *,
                 max_message_mb: int = DEFAULT_MAX_MESSAGE_MB):
        self.store, self.workers, self.rendezvous = store, workers, rendezvous
        self.max_message_mb = max_message_mb
        self.queue: queue.Queue[tuple[Run, RLConfig, object]] = queue.Queue()
        threading.Thread(target=self._loop, name="scheduler", daemon=True).start()

    def submit(self, run: Run, cfg: RLConfig, tokenizer) -> None:
        self.queue.put((run, cfg, tokenizer))

    def resume(self, run: Run, roots: RunRoots) -> None:
        """A run that was active when the coordinator stopped: queued to go on from its last checkpoint
        (recovery.py), with its paths checked against this coordinator's roots again."""
        try:
            cfg = load_config(run.config_yaml, source="the run's config.yaml")
            confine_run(cfg, roots)
            tokenizer = load_tokenizer(cfg.models.policy.load)
        except Exception as exc:  # noqa: BLE001 - reported on the run; the coordinator serves the others
            run.fail(f"the coordinator restarted and cannot resume this run: {exc}")
            return
        checkpoint, episode = resume_point(run, cfg.runtime_args.resume_from)
        cfg.runtime_args.resume_from = checkpoint
        run.pause_requested = run.state == cpb.PAUSED
        run.rollback(episode, f"the coordinator restarted: the run resumes from {checkpoint or 'its start'} "
                              f"(episode {episode}){redone_steps(episode, run.step)} once a trainer and a rollout "
                              f"replica are registered")
        run.set_state(cpb.PENDING, "waiting for workers")
        self.submit(run, cfg, tokenizer)

    def _loop(self) -> None:
        while True:
            run, cfg, tokenizer = self.queue.get()
            probe = cfg.runtime_args.rpc_timeout_s.control
            while run.state == cpb.PENDING and not run.stop_requested:
                trainers = self.workers.serving(cpb.TRAINER, probe)   # rollouts are probed only once one answers
                rollouts = self.workers.serving(cpb.ROLLOUT, probe) if trainers else []
                if trainers and rollouts:
                    break
                self.workers.changed.wait(timeout=1.0)
                self.workers.changed.clear()
            if run.stop_requested:
                run.set_state(cpb.STOPPED, "stopped before it started")
                continue
            self._execute(run, cfg, tokenizer, trainers[0].address, [w.address for w in rollouts])

    def _execute(self, run: Run, cfg: RLConfig, tokenizer, trainer_addr: str, rollout_addrs: list[str]) -> None:
        ra, rw = cfg.runtime_args, cfg.models.reward
        setup = pb.SetupRequest(run_id=run.run_id, config_yaml=run.config_yaml)
        rollouts = RolloutPool([], max_message_mb=self.max_message_mb, timeouts=ra.rpc_timeout_s,
                               retries=ra.step_retries, max_sequences=ra.sample_per_episode, report=run.log,
                               run_id=run.run_id)
        membership = Membership(rollouts, self.workers, setup)
        recovery = TrainerRecovery(run, cfg, self.workers)
        try:
            run.set_state(cpb.RUNNING, f"running on trainer {trainer_addr} and {len(rollout_addrs)} rollout replicas")
            with RewardPool(rw.name, timeout_s=rw.timeout_s, workers=rw.num_workers) as reward:
                while True:
                    try:
                        trainer = TrainerClient(trainer_addr, max_message_mb=self.max_message_mb,
                                                timeouts=ra.rpc_timeout_s, secret=self.workers.secret(trainer_addr))
                        trainer.handshake()
                        info = trainer.call("Setup", setup, "setup")
                        if not membership.started:
                            membership.start(rollout_addrs, info)
                        run_grpo(RunContext(cfg=cfg, run=run, tokenizer=tokenizer, trainer=trainer, rollouts=rollouts,
                                            membership=membership, reward=reward,
                                            sync=WeightSync(self.rendezvous, trainer, rollouts,
                                                            bucket_mb=ra.weight_sync_bucket_mb)))
                        break
                    except StepError as exc:
                        trainer_addr = recovery.recover(exc, trainer)   # re-raises unless the trainer was lost
            run.set_state(cpb.FINISHED, f"finished {run.step} steps")
        except StopRequested:
            run.set_state(cpb.STOPPED, f"stopped after step {run.step}")
        except StepError as exc:
            log.error("run %s failed: %s", run.run_id, exc)
            run.fail(str(exc), exc.metrics)
        except grpc.RpcError as exc:
            log.error("run %s failed: %s", run.run_id, exc.details())
            run.fail(f"{exc.code().name}: {exc.details()}")
        except Exception as exc:  # noqa: BLE001 - a failed run is reported, the coordinator keeps serving
            log.exception("run %s failed", run.run_id)
            run.fail(f"{type(exc).__name__}: {exc}")
        finally:
            membership.close()


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServiceServicer):
    def __init__(self, store: RunStore, workers: WorkerRegistry, scheduler: Scheduler,
                 roots: RunRoots | None = None):
        self.store, self.workers, self.scheduler = store, workers, scheduler
        self.roots = roots or RunRoots.defaults()

    def _run(self, run_id: str) -> Run:
        run = self.store.get(run_id)
        if run is None:
            raise NotFound(f"run_id {run_id!r} not found; ListRuns shows the known runs")
        return run

    @handle_errors
    def StartRun(self, request, context):
        if not (request.config_yaml or request.config_path or request.overrides):
            raise InvalidArgument("give config_yaml, config_path or overrides")
        cfg = read_config(request, self.roots)   # config_path only from --config-dir; the text is data
        p, ra = cfg.models.policy, cfg.runtime_args
        if not p.load:
            raise InvalidArgument("models.policy.load is empty: set it to an HF model directory")
        confine_run(cfg, self.roots)   # every path inside the roots, before anything is opened
        tokenizer = load_tokenizer(p.load)   # a bad path is the caller's error, reported now
        for key, path in (("data_path", ra.data_path), ("eval_data_path", ra.eval_data_path)):
            if (path or key == "data_path") and not os.path.isfile(path):
                raise InvalidArgument(f"runtime_args.{key} is not a file on the coordinator's host")
        if ra.resume_from and not os.path.isfile(os.path.join(ra.resume_from, "rlgrid_meta.json")):
            raise InvalidArgument("runtime_args.resume_from is not a checkpoint directory (no rlgrid_meta.json); "
                                  "name a runs/<run_id>/checkpoint-<episode> directory")
        run = self.store.create(config_to_yaml(cfg), ra.output_dir, ra.num_episode, exp_name=ra.exp_name)
        run.listeners.append(metrics.observe)
        self.scheduler.submit(run, cfg, tokenizer)
        log.info("run %s submitted (%d steps)", run.run_id, ra.num_episode)
        return run.to_proto()

    @handle_errors
    def GetRun(self, request, context):
        return self._run(request.run_id).to_proto()

    @handle_errors
    def ListRuns(self, request, context):
        return cpb.RunList(runs=[r.to_proto() for r in self.store.all()])

    @handle_errors
    def WatchRun(self, request, context):
        run = self._run(request.run_id)
        sent = 0
        while context.is_active():
            with run.cond:
                while sent == len(run.events) and run.state not in TERMINAL and context.is_active():
                    run.cond.wait(timeout=1.0)
                events, finished = run.events[sent:], run.state in TERMINAL
            sent += len(events)
            for e in events:
                if e["metrics"] and e["state"] not in TERMINAL and e["step"] < request.from_step:
                    continue
                yield cpb.RunEvent(run_id=run.run_id, state=e["state"], step=e["step"], metrics=e["metrics"],
                                   message=e["message"], time=e["time"])
            if finished and sent == len(run.events):
                return

    def _set_paused(self, run_id: str, paused: bool) -> cpb.RunInfo:
        run = self._run(run_id)
        with run.cond:
            if run.state in TERMINAL:
                raise FailedPrecondition(f"run {run.run_id} has ended ({cpb.RunState.Name(run.state)})")
            run.pause_requested = paused   # the loop acts on it at its next control point
            run.cond.notify_all()
        return run.to_proto()

    @handle_errors
    def PauseRun(self, request, context):
        return self._set_paused(request.run_id, True)

    @handle_errors
    def ResumeRun(self, request, context):
        return self._set_paused(request.run_id, False)

    @handle_errors
    def StopRun(self, request, context):
        run = self._run(request.run_id)
        with run.cond:
            if run.state not in TERMINAL:
                run.stop_requested = True
                run.cond.notify_all()
        return run.to_proto()

    @handle_errors
    def ListWorkers(self, request, context):
        return cpb.WorkerList(workers=self.workers.alive())

    @handle_errors
    def RegisterWorker(self, request, context):
        return cpb.RegisterReply(worker_id=self.workers.register(request))


def serve(port: int, *, host: str = "localhost", state_dir: str = "./output/coordinator",
          advertise_host: str = "127.0.0.1", metrics_port: int | None = None, roots: RunRoots | None = None,
          transport: Transport = Transport(), options: dict | None = None) -> tuple[Server, CoordinatorServicer]:
    """The coordinator's gRPC server; its rendezvous store and metrics endpoint listen on `host` too.
    `options`: Server's keyword arguments (server_options; max_message_mb also bounds what runs send)."""
    options = options or {}
    store, workers = RunStore(state_dir), WorkerRegistry()
    rendezvous = Rendezvous(advertise_host, bind_host=host)
    scheduler = Scheduler(store, workers, rendezvous,
                          max_message_mb=options.get("max_message_mb", DEFAULT_MAX_MESSAGE_MB))
    servicer = CoordinatorServicer(store, workers, scheduler, roots)
    for run in store.interrupted:   # active when the coordinator last stopped: they go on (recovery.py)
        run.listeners.append(metrics.observe)
        scheduler.resume(run, servicer.roots)
    server = Server([(coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server, servicer,
                      cpb.DESCRIPTOR.services_by_name["CoordinatorService"].full_name)], host=host, port=port,
                    tls=transport.tls, insecure_no_auth=transport.insecure_no_auth, **options)
    if metrics_port is not None:
        metrics.serve(metrics_port, host)
    log.info("coordinator on %s:%d, state in %s; weight-sync rendezvous on port %d (advertised as %s)", host,
             server.port, os.path.abspath(state_dir), rendezvous.port, rendezvous.host)
    r = servicer.roots
    log.info("client paths confined to: config dir %s, output roots %s, data roots %s, model roots %s",
             r.config_dir, ", ".join(r.output.dirs), ", ".join(r.data.dirs), ", ".join(r.model.dirs))
    return server, servicer


def main() -> None:
    parser = argparse.ArgumentParser(description="rlgrid coordinator")
    parser.add_argument("--port", type=int, default=50050)
    parser.add_argument("--host", default="localhost",
                        help="interface for gRPC, the weight-sync rendezvous and metrics (default loopback; "
                             "beyond it RLGRID_AUTH_TOKEN or --insecure-no-auth)")
    parser.add_argument("--state-dir", default="./output/coordinator", help="index of runs (survives restarts)")
    parser.add_argument("--advertise-host", default="127.0.0.1",
                        help="host the services reach this coordinator's weight-sync rendezvous at")
    parser.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port (on --host)")
    parser.add_argument("--config-dir", default=DEFAULT_CONFIG_DIR,
                        help="the only directory StartRun's config_path may name a file in (default ./configs)")
    add_root_args(parser, "--output-root", "--data-root", "--model-root")
    add_security_args(parser)
    add_server_args(parser)
    args = parser.parse_args()
    setup_logging("coordinator")
    transport = transport_from_args(parser, args)
    roots = RunRoots(args.config_dir, roots_from_args(args, "--output-root"), roots_from_args(args, "--data-root"),
                     roots_from_args(args, "--model-root"))
    try:
        server, _ = serve(args.port, host=args.host, state_dir=args.state_dir, advertise_host=args.advertise_host,
                          metrics_port=args.metrics_port, roots=roots, transport=transport,
                          options=server_options(args))
    except InsecureServer as exc:
        raise SystemExit(f"coordinator: {exc}") from None
    server.wait()


if __name__ == "__main__":
    main()
