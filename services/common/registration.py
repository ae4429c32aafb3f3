"""Services announce themselves to the coordinator when they start, and again if it restarts."""
from __future__ import annotations

import logging
import threading

import grpc

from rlgrid.v1 import coordinator_pb2 as cpb
from rlgrid.v1 import coordinator_pb2_grpc
from services.common.rpc import make_channel

log = logging.getLogger(__name__)


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
                log.debug("coordinator %s not reachable yet: %s", coordinator, exc.code())
            stop.wait(interval)

    threading.Thread(target=loop, name="register", daemon=True).start()
    return stop
