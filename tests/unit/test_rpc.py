"""Tests for services.common.rpc: auth, health, reflection, error mapping and message limits."""
from __future__ import annotations

import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from rlgrid.v1 import common_pb2 as pb
from rlgrid.v1 import rollout_pb2 as rpb
from rlgrid.v1 import rollout_pb2_grpc
from services.common.rpc import (
    AUTH_ENV,
    FailedPrecondition,
    NotFound,
    Server,
    handle_errors,
    make_channel,
)
from services.rollout.server import RolloutServicer

TOKEN = "s3cret"
ROLLOUT = rpb.DESCRIPTOR.services_by_name["RolloutService"].full_name
TIMEOUT = 10


class ErrorServicer(RolloutServicer):
    """RolloutServicer (engine None) whose Setup raises what request.run_id names."""

    @handle_errors
    def Setup(self, request, context):
        kind = request.run_id
        if kind == "ok":
            return rpb.RolloutInfo(run_id="ok", model=str(len(request.config_yaml)))
        if kind == "value":
            raise ValueError("sampling.top_p must be in (0, 1]")
        if kind == "not_found":
            raise NotFound("no run 'r-17'")
        if kind == "precondition":
            raise FailedPrecondition("engine is not set up")
        if kind == "internal":
            raise RuntimeError("kaboom")
        if kind == "slow":
            time.sleep(1.5)
            return rpb.RolloutInfo(run_id="slow")
        if kind == "huge":   # e.g. vLLM's error listing every architecture it supports
            raise ValueError("models.policy.load='x': vLLM could not load it: " + "Arch, " * 5000)
        raise AssertionError(kind)


def _server(**kwargs) -> Server:
    servicer = ErrorServicer("test", torch.device("cpu"))
    return Server([(rollout_pb2_grpc.add_RolloutServiceServicer_to_server, servicer, ROLLOUT)],
                  **{"host": "127.0.0.1", "port": 0, **kwargs})


@pytest.fixture(autouse=True)
def _no_env_token(monkeypatch):
    monkeypatch.delenv(AUTH_ENV, raising=False)


@pytest.fixture
def auth_server():
    server = _server(auth_token=TOKEN)
    yield server
    server.stop(0)


@pytest.fixture
def open_server():
    server = _server(auth_token="")
    yield server
    server.stop(0)


def _address(server: Server) -> str:
    return f"127.0.0.1:{server.port}"


def test_auth_required_except_for_health(auth_server):
    address = _address(auth_server)
    with make_channel(address, auth_token="") as plain:
        stub = rollout_pb2_grpc.RolloutServiceStub(plain)
        with pytest.raises(grpc.RpcError) as info:
            stub.GetInfo(pb.Empty(), timeout=TIMEOUT)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # streaming RPCs are guarded too
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(rpb.GenerateRequest(n=1), timeout=TIMEOUT))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # health checks need no token
        health = health_pb2_grpc.HealthStub(plain)
        for service in ("", ROLLOUT):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with make_channel(address, auth_token="wrong") as wrong:
        with pytest.raises(grpc.RpcError) as info:
            rollout_pb2_grpc.RolloutServiceStub(wrong).GetInfo(pb.Empty(), timeout=TIMEOUT)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with make_channel(address, auth_token=TOKEN) as authed:
        info = rollout_pb2_grpc.RolloutServiceStub(authed).GetInfo(pb.Empty(), timeout=TIMEOUT)
        assert info.device == "cpu" and info.engine == ""


def test_token_from_environment(monkeypatch):
    monkeypatch.setenv(AUTH_ENV, TOKEN)
    server = _server()  # auth_token None: taken from the environment
    try:
        address = _address(server)
        with make_channel(address) as channel:  # the client takes it from the environment too
            assert rollout_pb2_grpc.RolloutServiceStub(channel).GetInfo(pb.Empty(), timeout=TIMEOUT).device == "cpu"
        with make_channel(address, auth_token="") as channel:
            with pytest.raises(grpc.RpcError) as info:
                rollout_pb2_grpc.RolloutServiceStub(channel).GetInfo(pb.Empty(), timeout=TIMEOUT)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        server.stop(0)


def test_reflection_lists_services(auth_server):
    with make_channel(_address(auth_server), auth_token=TOKEN) as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"rlgrid.v1.RolloutService", "grpc.health.v1.Health"} <= services


@pytest.mark.parametrize("kind,code,detail", [
    ("value", grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_p must be in (0, 1]"),
    ("not_found", grpc.StatusCode.NOT_FOUND, "no run 'r-17'"),
    ("precondition", grpc.StatusCode.FAILED_PRECONDITION, "engine is not set up"),
    ("internal", grpc.StatusCode.INTERNAL, "RuntimeError: kaboom"),
])
def test_handle_errors_maps_exceptions_and_keeps_serving(open_server, kind, code, detail):
    with make_channel(_address(open_server), auth_token="") as channel:
        stub = rollout_pb2_grpc.RolloutServiceStub(channel)
        for _ in range(2):  # the server survives the error
            with pytest.raises(grpc.RpcError) as info:
                stub.Setup(pb.SetupRequest(run_id=kind), timeout=TIMEOUT)
            assert info.value.code() == code
            assert info.value.details() == detail
        assert stub.Setup(pb.SetupRequest(run_id="ok"), timeout=TIMEOUT).run_id == "ok"
        assert stub.GetInfo(pb.Empty(), timeout=TIMEOUT).device == "cpu"


def test_huge_error_messages_are_cut_not_turned_into_resource_exhausted(open_server):
    """Status details travel as metadata (8 KiB cap); a longer message must not change the code."""
    with make_channel(_address(open_server), auth_token="") as channel:
        with pytest.raises(grpc.RpcError) as info:
            rollout_pb2_grpc.RolloutServiceStub(channel).Setup(pb.SetupRequest(run_id="huge"), timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("models.policy.load='x'") and "service log" in info.value.details()


def test_handle_errors_on_a_server_streaming_method(open_server):
    # the real Generate with no engine: FailedPrecondition raised inside a generator method
    with make_channel(_address(open_server), auth_token="") as channel:
        stub = rollout_pb2_grpc.RolloutServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(rpb.GenerateRequest(n=1), timeout=TIMEOUT))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "Setup" in info.value.details()
        assert stub.GetInfo(pb.Empty(), timeout=TIMEOUT).device == "cpu"


def test_message_size_limit():
    server = _server(auth_token="", max_message_mb=1)
    try:
        # the client allows far more, so the server's own limit is what is tested
        with make_channel(_address(server), auth_token="", max_message_mb=16) as channel:
            stub = rollout_pb2_grpc.RolloutServiceStub(channel)
            small = "x" * (512 * 1024)
            assert stub.Setup(pb.SetupRequest(run_id="ok", config_yaml=small), timeout=TIMEOUT).model == str(len(small))
            with pytest.raises(grpc.RpcError) as info:
                stub.Setup(pb.SetupRequest(run_id="ok", config_yaml="x" * (2 * 1024 * 1024)), timeout=TIMEOUT)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            # still serving afterwards
            assert stub.Setup(pb.SetupRequest(run_id="ok", config_yaml=small), timeout=TIMEOUT).run_id == "ok"
    finally:
        server.stop(0)


def test_client_side_limit_rejects_before_sending(open_server):
    with make_channel(_address(open_server), auth_token="", max_message_mb=1) as channel:
        with pytest.raises(grpc.RpcError) as info:
            rollout_pb2_grpc.RolloutServiceStub(channel).Setup(
                pb.SetupRequest(run_id="ok", config_yaml="x" * (2 * 1024 * 1024)), timeout=TIMEOUT)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


# ---- exposure, TLS and the worker secret (docs/security.md) ----------------------------------------

def test_a_server_beyond_loopback_needs_a_token_or_an_explicit_opt_out(caplog):
    from services.common.rpc import InsecureServer, is_loopback
    assert is_loopback("localhost") and is_loopback("127.0.0.1") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("")
    with pytest.raises(InsecureServer, match=f"{AUTH_ENV}.*--insecure-no-auth"):
        _server(host="0.0.0.0", auth_token="")
    with caplog.at_level("WARNING"):
        server = _server(host="0.0.0.0", auth_token="", insecure_no_auth=True)
    server.stop(0)
    assert "NO authentication" in caplog.text
    _server(host="0.0.0.0", auth_token=TOKEN).stop(0)   # a token is enough
    _server(host="localhost", auth_token="").stop(0)     # loopback needs nothing


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    from tests.certs import make_ca, make_leaf
    d = str(tmp_path_factory.mktemp("certs"))
    ca, ca_cert, ca_key = make_ca(d)
    other_ca, other_cert, other_key = make_ca(d, "other-ca")
    server = make_leaf(d, "server", ca_cert, ca_key)
    client = make_leaf(d, "client", ca_cert, ca_key)
    stranger = make_leaf(d, "stranger", other_cert, other_key)   # signed by a CA the server does not trust
    return {"ca": ca, "other_ca": other_ca, "server": server, "client": client, "stranger": stranger}


def _get_info(address: str, **kwargs):
    with make_channel(address, auth_token="", **kwargs) as channel:
        return rollout_pb2_grpc.RolloutServiceStub(channel).GetInfo(pb.Empty(), timeout=TIMEOUT)


def test_tls_server_answers_tls_clients_only(certs):
    from services.common.rpc import ClientTLS, ServerTLS, wait_healthy
    server = _server(auth_token="", tls=ServerTLS(*certs["server"]))
    address = f"localhost:{server.port}"
    try:
        assert _get_info(address, tls=ClientTLS(certs["ca"])).device == "cpu"
        wait_healthy(address, timeout=TIMEOUT, tls=ClientTLS(certs["ca"]))
        with pytest.raises(grpc.RpcError) as info:   # plaintext
            _get_info(address)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError) as info:   # a client that trusts another CA
            _get_info(address, tls=ClientTLS(certs["other_ca"]))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(0)


def test_mutual_tls_requires_a_client_certificate_from_the_ca(certs):
    from services.common.rpc import ClientTLS, ServerTLS
    server = _server(auth_token="", tls=ServerTLS(*certs["server"], client_ca=certs["ca"]))
    address = f"localhost:{server.port}"
    try:
        assert _get_info(address, tls=ClientTLS(certs["ca"], *certs["client"])).device == "cpu"
        for tls in (ClientTLS(certs["ca"]), ClientTLS(certs["ca"], *certs["stranger"])):
            with pytest.raises(grpc.RpcError) as info:
                _get_info(address, tls=tls)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(0)


def test_tls_server_name_for_certificates_that_do_not_list_the_address(tmp_path):
    """Services reached by container IPs carry a certificate for a fixed name: --tls-server-name."""
    from services.common.rpc import ClientTLS, ServerTLS
    from tests.certs import make_ca, make_leaf
    ca, ca_cert, ca_key = make_ca(str(tmp_path))
    server = _server(auth_token="", tls=ServerTLS(*make_leaf(str(tmp_path), "named", ca_cert, ca_key,
                                                             dns=("rlgrid-service",), ips=())))
    try:
        assert _get_info(f"localhost:{server.port}", tls=ClientTLS(ca, server_name="rlgrid-service")).device == "cpu"
        with pytest.raises(grpc.RpcError) as info:
            _get_info(f"localhost:{server.port}", tls=ClientTLS(ca))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(0)


def test_worker_secret_guards_every_method_but_get_info():
    server = _server(auth_token=TOKEN, worker_secret="w0rker", open_methods=[f"/{ROLLOUT}/GetInfo"])
    address = _address(server)
    try:
        def call(method, request, **kwargs):
            with make_channel(address, **{"auth_token": TOKEN, **kwargs}) as channel:
                return getattr(rollout_pb2_grpc.RolloutServiceStub(channel), method)(request, timeout=TIMEOUT)
        assert call("GetInfo", pb.Empty()).device == "cpu"                     # open without the secret
        assert call("Setup", pb.SetupRequest(run_id="ok"), worker_secret="w0rker").run_id == "ok"
        for method, request in (("Setup", pb.SetupRequest(run_id="ok")), ("PrepareWeightSync", pb.WeightSyncPlan()),
                                ("CommitWeights", pb.WeightSyncRequest())):
            for secret in (None, "w0rke", "w0rker-and-more"):
                with pytest.raises(grpc.RpcError) as info:
                    call(method, request, worker_secret=secret)
                assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
                assert "w0rker" not in info.value.details()
        with pytest.raises(grpc.RpcError) as info:   # a wrong secret is refused even where none is needed
            call("GetInfo", pb.Empty(), worker_secret="guess")
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as info:   # the token is checked first
            call("Setup", pb.SetupRequest(run_id="ok"), worker_secret="w0rker", auth_token="nope")
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        server.stop(0)


def test_streams_are_bounded_and_never_take_the_unary_threads():
    """Each open stream holds a server thread: past max_streams they are answered RESOURCE_EXHAUSTED
    at once, unary calls keep answering, and a closed stream frees its slot."""
    server = _server(auth_token="", max_streams=2, max_workers=4)
    try:
        with make_channel(_address(server), auth_token="") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            stub = rollout_pb2_grpc.RolloutServiceStub(channel)
            watches = [health.Watch(health_pb2.HealthCheckRequest(), timeout=60) for _ in range(2)]
            for w in watches:   # grpc.health's Watch is a real blocking stream: first status, then it waits
                assert next(w).status == health_pb2.HealthCheckResponse.SERVING
            for _ in range(6):   # more than the 4 threads: each is refused at once, none waits for a thread
                with pytest.raises(grpc.RpcError) as info:
                    next(health.Watch(health_pb2.HealthCheckRequest(), timeout=TIMEOUT))
                assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "--max-streams" in info.value.details()
            assert stub.GetInfo(pb.Empty(), timeout=2).device == "cpu"
            watches[0].cancel()
            deadline = time.time() + TIMEOUT
            while True:   # the slot comes back once the server has seen the cancellation
                try:
                    assert next(health.Watch(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)).status
                    break
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.time() < deadline
                    time.sleep(0.05)
    finally:
        server.stop(0)


def test_a_flood_of_unary_calls_is_refused_past_max_calls_instead_of_queued():
    """Calls past max_calls (served or waiting for one of the threads) are answered RESOURCE_EXHAUSTED
    at once; the rest are served, and once the flood has drained the server answers again."""
    from concurrent.futures import ThreadPoolExecutor
    server = _server(auth_token="", max_streams=1, max_workers=4, max_calls=6)
    try:
        with make_channel(_address(server), auth_token="") as channel:
            stub = rollout_pb2_grpc.RolloutServiceStub(channel)

            def slow(_):
                start = time.monotonic()
                try:
                    return stub.Setup(pb.SetupRequest(run_id="slow"), timeout=30).run_id, time.monotonic() - start
                except grpc.RpcError as exc:
                    return exc.code(), time.monotonic() - start
            with ThreadPoolExecutor(24) as pool:
                results = list(pool.map(slow, range(24)))
            served = [t for r, t in results if r == "slow"]
            refused = [t for r, t in results if r == grpc.StatusCode.RESOURCE_EXHAUSTED]
            assert len(served) + len(refused) == 24, results
            assert 1 <= len(served) <= 6 + 2 and len(refused) >= 24 - 8, results   # a late call may find room
            assert max(refused) < 1.0, refused   # refused at once, never after waiting for a slow call (1.5 s)
            assert stub.Setup(pb.SetupRequest(run_id="ok"), timeout=TIMEOUT).run_id == "ok"
    finally:
        server.stop(0)


def test_the_health_port_serves_health_alone_on_loopback():
    """--health-port answers grpc.health.v1 without the token the API port needs, and nothing else."""
    from services.coordinator.local import free_port
    server = _server(auth_token=TOKEN, health_port=free_port())
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.health_port}") as channel:
            check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=ROLLOUT),
                                                              timeout=TIMEOUT)
            assert check.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as info:
                rollout_pb2_grpc.RolloutServiceStub(channel).GetInfo(pb.Empty(), timeout=TIMEOUT)
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        with pytest.raises(RuntimeError, match="--health-port"):   # taken: refused, naming the flag
            _server(auth_token=TOKEN, health_port=server.health_port)
        with pytest.raises(RuntimeError, match=f"could not bind 127.0.0.1:{server.port}"):   # the API port too
            _server(auth_token=TOKEN, port=server.port)
    finally:
        server.stop(0)


def test_max_calls_must_cover_the_threads():
    with pytest.raises(ValueError, match="--max-calls"):
        _server(auth_token="", max_workers=16, max_calls=8)


def test_security_flags_go_together(monkeypatch, capsys):
    import argparse

    from services.common import rpc
    from services.common.security import add_security_args, transport_from_args
    monkeypatch.setattr(rpc, "_client_tls", None)
    parser = argparse.ArgumentParser()
    add_security_args(parser)

    def parse(*argv):
        return transport_from_args(parser, parser.parse_args(list(argv)))
    for argv, error in ((["--tls-cert", "c"], "--tls-cert and --tls-key go together"),
                        (["--tls-client-ca", "ca"], "--tls-client-ca (mutual TLS) needs --tls-cert"),
                        (["--tls-client-cert", "c", "--tls-client-key", "k"], "need --tls-ca"),
                        (["--tls-server-name", "n"], "need --tls-ca")):
        with pytest.raises(SystemExit):
            parse(*argv)
        assert error in capsys.readouterr().err
    transport = parse("--tls-cert", "c", "--tls-key", "k", "--tls-client-ca", "ca", "--tls-ca", "ca",
                      "--insecure-no-auth")
    assert transport.tls == rpc.ServerTLS("c", "k", "ca") and transport.insecure_no_auth
    assert rpc._client_tls == rpc.ClientTLS("ca")   # every channel this process opens now uses TLS


def test_max_streams_must_leave_threads_for_unary_calls():
    with pytest.raises(ValueError, match="--max-streams"):
        _server(auth_token="", max_streams=16, max_workers=16)


def test_a_new_channel_reaches_a_restarted_service_at_once():
    """A channel whose service died keeps retrying with a backoff; a new channel to the service, once it
    is back on the same port, must not inherit that backoff (gRPC shares connections between channels
    by default), and the old channel reconnects within seconds, not minutes."""
    from services.common.rpc import MAX_RECONNECT_BACKOFF_MS
    from services.coordinator.local import free_port

    def check(channel) -> str:
        try:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
            return "SERVING"
        except grpc.RpcError as exc:
            return exc.code().name

    port = free_port()
    old = make_channel(f"localhost:{port}")
    assert [check(old) for _ in range(3)] == ["UNAVAILABLE"] * 3   # nobody there: it backs off
    server = Server([], host="localhost", port=port)
    try:
        assert check(make_channel(f"localhost:{port}")) == "SERVING"
        deadline = time.monotonic() + MAX_RECONNECT_BACKOFF_MS / 1000 * 1.5 + 5
        while check(old) != "SERVING":
            assert time.monotonic() < deadline, "the old channel did not reconnect within its backoff"
            time.sleep(0.2)
    finally:
        server.stop(0)
