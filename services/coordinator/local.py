"""Service processes on this machine: the demo, the integration tests and the GPU benchmarks start
the coordinator, trainers and rollout replicas through this one helper."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field

import grpc

from services.common.rpc import ClientTLS, make_channel, wait_healthy
from services.common.worker import WORKER_SECRET_ENV

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Proc:
    name: str
    address: str
    popen: subprocess.Popen
    log_path: str

    def log_tail(self, n: int = 40) -> str:
        with open(self.log_path) as f:
            return "".join(f.readlines()[-n:])


@dataclass(frozen=True)
class LocalTLS:
    """PEM files for a local cluster: one CA, and one certificate (valid for localhost) that every
    service serves and presents as a client. Trainers and rollouts require it from their callers
    (mutual TLS: only the coordinator steers them); the coordinator requires client certificates
    only with `coordinator_mtls` (else grpcurl needs just the CA)."""
    ca: str
    cert: str
    key: str
    coordinator_mtls: bool = False

    def client(self) -> ClientTLS:
        return ClientTLS(self.ca, self.cert, self.key)

    def flags(self, module: str) -> list[str]:
        mutual = module != "services.coordinator" or self.coordinator_mtls
        return ["--tls-cert", self.cert, "--tls-key", self.key, *(["--tls-client-ca", self.ca] if mutual else []),
                "--tls-ca", self.ca, "--tls-client-cert", self.cert, "--tls-client-key", self.key]


# the root flags each service takes (services.common.paths.ROOT_FLAGS)
_ROOT_FLAGS = {"services.coordinator": ("--output-root", "--data-root", "--model-root"),
               "services.trainer": ("--output-root", "--model-root"), "services.rollout": ("--model-root",)}


@dataclass
class LocalCluster:
    """Starts `python -m services.<name> --port <free port> ...` processes, logging to log_dir.

    `roots`: directories every service may read and write client-named paths under (each root flag of
    each service; default: the services' own defaults). `worker_secret`: fixed for the trainers and
    rollouts it starts, so the caller can steer them itself (`channel(proc)`); `tls`: every service
    serves and calls over TLS; `env`: added to every process's environment (e.g. RLGRID_AUTH_TOKEN)."""
    log_dir: str
    procs: list[Proc] = field(default_factory=list)
    roots: list[str] = field(default_factory=list)
    worker_secret: str | None = None
    tls: LocalTLS | None = None
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        os.makedirs(self.log_dir, exist_ok=True)

    def start(self, name: str, module: str, *args: str, env: dict | None = None, port: int | None = None,
              nproc: int = 1) -> Proc:
        """nproc > 1 launches the module under torchrun (one process per rank; rank 0 serves)."""
        port = port or free_port()
        launcher = (["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1
                    else [])
        log_path = os.path.join(self.log_dir, f"{name}.log")
        args = (*args, *[a for flag in _ROOT_FLAGS.get(module, ()) for root in self.roots for a in (flag, root)],
                *(self.tls.flags(module) if self.tls and module in _ROOT_FLAGS else ()))
        secret = {WORKER_SECRET_ENV: self.worker_secret} if self.worker_secret and module != "services.coordinator" \
            else {}
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1",
               **secret, **self.env, **(env or {})}
        with open(log_path, "w") as log:
            popen = subprocess.Popen([sys.executable, *launcher, "-m", module, "--port", str(port), *args], stdout=log,
                                     stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True, env=env)
        proc = Proc(name, f"localhost:{port}", popen, log_path)
        self.procs.append(proc)
        return proc

    def channel(self, proc: Proc, **kwargs) -> grpc.Channel:
        """A channel to `proc` with this cluster's TLS, carrying the worker secret (harmless to the coordinator)."""
        return make_channel(proc.address, **{"worker_secret": self.worker_secret,
                                             "tls": self.tls.client() if self.tls else None, **kwargs})

    def wait_healthy(self, proc: Proc, timeout: float = 120.0) -> None:
        try:
            wait_healthy(proc.address, timeout=timeout, tls=self.tls.client() if self.tls else None)
        except Exception as exc:
            raise RuntimeError(f"{proc.name} did not come up: {exc}\n{proc.log_tail()}") from exc

    def stop(self, proc: Proc) -> None:
        if proc.popen.poll() is None:
            os.killpg(proc.popen.pid, signal.SIGTERM)
            try:
                proc.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.popen.pid, signal.SIGKILL)
        self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in list(self.procs):
            self.stop(proc)

    def deploy(self, state_dir: str, replicas: int = 1, device: str = "cpu", trainer_nproc: int = 1,
               rollout_env: dict | None = None) -> tuple[Proc, Proc, list[Proc]]:
        """A coordinator, one trainer (on `trainer_nproc` ranks) and `replicas` rollout services registered
        with it, all serving."""
        coordinator = self.start("coordinator", "services.coordinator", "--state-dir", state_dir)
        self.wait_healthy(coordinator)
        trainer = self.start("trainer", "services.trainer", "--coordinator", coordinator.address, "--device", device,
                             nproc=trainer_nproc)
        rollouts = [self.start(f"rollout{i}", "services.rollout", "--coordinator", coordinator.address,
                               "--device", device, env=rollout_env) for i in range(replicas)]
        for proc in [trainer, *rollouts]:
            self.wait_healthy(proc)
        return coordinator, trainer, rollouts
