"""What the rollout and trainer services share at start: their command line, their device, and
announcing themselves to the coordinator (when they start, and again if it restarts)."""
from __future__ import annotations

import argparse
import logging
import os
import secrets
import threading

import grpc
import torch

from rlgrid.v1 import coordinator_pb2 as cpb
from rlgrid.v1 import coordinator_pb2_grpc
from services.common.models import resolve_device
from services.common.paths import add_root_args
from services.common.rpc import Server, add_server_args, make_channel
from services.common.security import Transport, add_security_args

log = logging.getLogger(__name__)

# A worker's secret (docs/security.md): random per start unless the operator fixes it here (tests do,
# to call a worker's steering RPCs directly).
WORKER_SECRET_ENV = "RLGRID_WORKER_SECRET"


def register_forever(coordinator: str, info: cpb.WorkerInfo, *, interval: float = 5.0) -> threading.Event:
    """Registers in a daemon thread and re-registers every `interval` seconds (a restarted
    coordinator learns its workers again; registering is idempotent). Returns a stop event."""
    stop = threading.Event()

    def loop() -> None:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(make_channel(coordinator))
        announced = False
        while not stop.is_set():
            try:
                stub.RegisterWorker(info, timeout=10)
                if not announced:
                    log.info("registered with coordinator %s as %s", coordinator, info.address)
                    announced = True
            except grpc.RpcError as exc:
                announced = False
                if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    log.debug("coordinator %s not reachable yet: %s", coordinator, exc.code())
                else:   # refused: a wrong token, TLS, or the coordinator could not verify our secret
                    log.warning("coordinator %s refused the registration: %s %s", coordinator, exc.code().name,
                                exc.details())
            stop.wait(interval)

    threading.Thread(target=loop, name="register", daemon=True).start()
    return stop


def worker_parser(name: str, port: int) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=f"rlgrid {name} service")
    parser.add_argument("--port", type=int, default=port)
    parser.add_argument("--host", default="localhost",
                        help="interface to serve on (default loopback; beyond it a token or --insecure-no-auth)")
    parser.add_argument("--advertise", help="host:port the coordinator reaches this service at")
    parser.add_argument("--coordinator", help="coordinator host:port to register with")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 (default: LOCAL_RANK's GPU, else cpu)")
    add_root_args(parser, "--model-root")
    add_security_args(parser)
    add_server_args(parser)
    return parser


def worker_device(device: str | None) -> torch.device:
    """`cuda` (or nothing, on a GPU machine) means this rank's GPU: LOCAL_RANK under torchrun."""
    dev = torch.device(device) if device and device != "cuda" else resolve_device()
    if dev.type == "cuda":
        torch.cuda.set_device(dev)   # NCCL groups and default allocations use this GPU
    return dev


def start_worker(kind: int, registration: tuple, *, host: str, port: int, advertise: str | None,
                 coordinator: str | None, device: torch.device, transport: Transport = Transport(),
                 options: dict | None = None) -> tuple[Server, str]:
    """Serves one servicer (with reflection, health, auth, TLS) and registers it; returns the server and
    the address the coordinator reaches it at. Every RPC of the servicer but GetInfo needs this worker's
    secret, which only the coordinator it registers with learns. `options`: Server's keyword
    arguments (server_options: limits, health port)."""
    secret = os.environ.get(WORKER_SECRET_ENV) or secrets.token_urlsafe(32)
    service = registration[2]
    server = Server([registration], host=host, port=port, tls=transport.tls,
                    insecure_no_auth=transport.insecure_no_auth, worker_secret=secret,
                    open_methods=[f"/{service}/GetInfo"], **(options or {}))
    address = advertise or f"localhost:{server.port}"
    log.info("%s service on port %d (device %s)", cpb.WorkerKind.Name(kind).lower(), server.port, device)
    if coordinator:
        register_forever(coordinator, cpb.WorkerInfo(kind=kind, address=address, device=str(device), secret=secret))
    return server, address
