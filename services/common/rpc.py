"""gRPC plumbing shared by the three services: servers with reflection, health, auth, TLS and
deliberate message limits; channels that carry the auth token (and a worker's secret) over TLS when
configured; errors mapped to status codes. docs/security.md describes the model."""
from __future__ import annotations

import contextlib
import functools
import hmac
import inspect
import ipaddress
import logging
import os
import socket
import threading
from concurrent import futures
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

log = logging.getLogger(__name__)

AUTH_ENV = "RLGRID_AUTH_TOKEN"
# The secret a worker accepts steering calls with travels in this metadata key (docs/security.md).
WORKER_SECRET_KEY = "x-rlgrid-worker-secret"
# gRPC's 4 MiB default is too small for a step's samples. The limit is one deployment setting
# (--max-message-mb, or this variable) that every service starts with and reports in GetInfo: the
# coordinator sends at most the smallest of its own and the receiver's, and names the setting.
MAX_MESSAGE_ENV = "RLGRID_GRPC_MAX_MESSAGE_MB"
DEFAULT_MAX_MESSAGE_MB = int(os.environ.get(MAX_MESSAGE_ENV, "64"))
# A streaming call holds one server thread for as long as it is open (sync gRPC). At most this
# many are open at once per server, so unary calls (registration, health, control) always find a
# thread; past the bound a stream is answered RESOURCE_EXHAUSTED.
DEFAULT_MAX_WORKERS = 16
DEFAULT_MAX_STREAMS = 8
DEFAULT_MAX_CALLS = 64   # calls being served or waiting for a thread, of every kind
HEALTH_PORT_ENV = "RLGRID_HEALTH_PORT"   # --health-port's default (the images set it for their HEALTHCHECK)
_HEALTH_PREFIX = "/grpc.health.v1.Health/"
MAX_ERROR_CHARS = 2000


class RpcError(Exception):
    """An error with the gRPC status it should be answered with."""

    code = grpc.StatusCode.INTERNAL


class InvalidArgument(RpcError, ValueError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(RpcError, KeyError):
    code = grpc.StatusCode.NOT_FOUND

    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return str(self.args[0]) if self.args else ""


class FailedPrecondition(RpcError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class PermissionDenied(RpcError):
    code = grpc.StatusCode.PERMISSION_DENIED


def add_server_args(parser) -> None:
    """The command-line flags of Server's limits and health port, shared by the three services."""
    parser.add_argument("--max-message-mb", type=int, default=DEFAULT_MAX_MESSAGE_MB,
                        help=f"largest gRPC message sent or received, MiB (default ${MAX_MESSAGE_ENV} or 64); "
                             f"the coordinator uses the smallest of its own and each worker's")
    parser.add_argument("--max-streams", type=int, default=DEFAULT_MAX_STREAMS,
                        help="streaming calls (WatchRun, Generate, Train, ...) open at once; more are answered "
                             "RESOURCE_EXHAUSTED")
    parser.add_argument("--max-calls", type=int, default=DEFAULT_MAX_CALLS,
                        help="calls of any kind in progress or waiting for one of the server's threads; more are "
                             "answered RESOURCE_EXHAUSTED at once, so a flood of calls cannot queue without bound")
    parser.add_argument("--health-port", type=int, default=int(os.environ.get(HEALTH_PORT_ENV) or 0),
                        help="also serve grpc.health.v1, and nothing else, in plaintext on 127.0.0.1:PORT: a probe "
                             "in the same host or container (the images' HEALTHCHECK) then works whatever secures "
                             f"the main port (TLS, mutual TLS, a token). Default ${HEALTH_PORT_ENV}, else 0: off")


def server_options(args) -> dict[str, int]:
    """Server's keyword arguments from add_server_args's flags."""
    return dict(max_message_mb=args.max_message_mb, max_streams=args.max_streams, max_calls=args.max_calls,
                health_port=args.health_port)


# A channel reconnects after a failure at most this long after the last try (gRPC's default is 120 s),
# so a service that restarts is reachable again within seconds: a worker re-registers with a restarted
# coordinator, and the coordinator reaches a restarted worker.
MAX_RECONNECT_BACKOFF_MS = 5000


def channel_options(max_message_mb: int = DEFAULT_MAX_MESSAGE_MB) -> list[tuple[str, Any]]:
    limit = max_message_mb * 1024 * 1024
    return [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit),
            ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
            # each channel its own connections: a new channel to a restarted service must not inherit the
            # reconnect backoff of an old channel's connection to the process that died (gRPC shares
            # connections between channels of one target by default)
            ("grpc.use_local_subchannel_pool", 1)]


def _status_for(exc: BaseException) -> grpc.StatusCode:
    if isinstance(exc, RpcError):
        return exc.code
    if isinstance(exc, ValueError):  # TensorError, ConfigError and the like: the caller's input
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.INTERNAL


def handle_errors(method: Callable) -> Callable:
    """Maps exceptions raised by a servicer method to a gRPC status with the message.

    Unexpected exceptions are logged with a traceback and answered INTERNAL; the server keeps
    serving either way.
    """
    def fail(context: grpc.ServicerContext, exc: BaseException) -> None:
        if isinstance(exc, grpc.RpcError) and not context.is_active():
            return   # the call was cancelled (by its caller, or by time_limit) while reading its requests
        code = _status_for(exc)
        if code == grpc.StatusCode.INTERNAL:
            log.exception("%s failed", method.__qualname__)
        message = f"{type(exc).__name__}: {exc}" if code == grpc.StatusCode.INTERNAL else str(exc)
        if len(message) > MAX_ERROR_CHARS:   # status details travel as metadata, which gRPC caps at 8 KiB
            log.error("%s: %s", method.__qualname__, message)
            message = message[:MAX_ERROR_CHARS] + " ... (cut; the service log has all of it)"
        context.abort(code, message)

    if inspect.isgeneratorfunction(method):
        @functools.wraps(method)
        def stream_wrapper(self, request, context):
            try:
                yield from method(self, request, context)
            except Exception as exc:  # noqa: BLE001 - every error becomes a status
                fail(context, exc)
        return stream_wrapper

    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except Exception as exc:  # noqa: BLE001
            fail(context, exc)
    return wrapper


def _deny_like(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same streaming kind as `handler` that aborts with `code`."""
    def deny(request, context):
        context.abort(code, message)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny)
    return grpc.unary_unary_rpc_method_handler(deny)


def _same(given: str | None, expected: str) -> bool:
    """Constant-time comparison: the time taken says nothing about how much of a secret matched."""
    return hmac.compare_digest((given or "").encode(), expected.encode())
@contextlib.contextmanager
def time_limit(context: grpc.ServicerContext, seconds: float):
    """Cancels the call if the block still runs after `seconds`: a caller that sends or reads a stream
    too slowly (or not at all) cannot hold a stream slot, and its thread, for longer than that."""
    timer = threading.Timer(seconds, context.cancel)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


class _AuthInterceptor(grpc.ServerInterceptor):
    """Requires `authorization: Bearer <token>` on every RPC except health checks (when a token is
    set), and a worker's secret on every method of `guarded` services except `open_methods`."""

    def __init__(self, token: str | None, worker_secret: str | None = None, guarded: Iterable[str] = (),
                 open_methods: Iterable[str] = ()):
        self._expected = f"Bearer {token}" if token else None
        self._secret = worker_secret
        self._guarded = tuple(f"/{name}/" for name in guarded)
        self._open = frozenset(open_methods)

    def intercept_service(self, continuation, details):
        if details.method.startswith(_HEALTH_PREFIX):
            return continuation(details)
        metadata = dict(details.invocation_metadata or ())
        denial = None
        if self._expected and not _same(metadata.get("authorization"), self._expected):
            denial = (grpc.StatusCode.UNAUTHENTICATED,
                      f"missing or wrong 'authorization: Bearer <token>' metadata (token set by {AUTH_ENV})")
        elif self._secret is not None:
            given = metadata.get(WORKER_SECRET_KEY)
            steering = details.method.startswith(self._guarded) and details.method not in self._open
            if (given is not None or steering) and not _same(given, self._secret):
                denial = (grpc.StatusCode.PERMISSION_DENIED,
                          f"{details.method} steers this worker: only the coordinator it registered with may "
                          f"call it (with the worker's secret in '{WORKER_SECRET_KEY}' metadata)")
        if denial is None:
            return continuation(details)
        handler = continuation(details)
        return None if handler is None else _deny_like(handler, *denial)


class InsecureServer(RuntimeError):
    """A server would listen beyond loopback without a token and without --insecure-no-auth."""


def is_loopback(host: str) -> bool:
    """True when every address `host` names is a loopback address (a name is resolved)."""
    if host in ("", "0.0.0.0", "::", "[::]"):
        return False
    try:
        infos = socket.getaddrinfo(host.strip("[]"), None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@dataclass(frozen=True)
class ServerTLS:
    """A server's certificate (PEM files); with `client_ca`, clients must present a certificate signed
    by it (mutual TLS) on every connection."""
    cert: str
    key: str
    client_ca: str | None = None

    def credentials(self) -> grpc.ServerCredentials:
        ca = _read(self.client_ca) if self.client_ca else None
        return grpc.ssl_server_credentials([(_read(self.key), _read(self.cert))], root_certificates=ca,
                                           require_client_auth=ca is not None)


@dataclass(frozen=True)
class ClientTLS:
    """How this process's channels check servers: the CA that signed their certificates, optionally
    a client certificate (mutual TLS) and the name the servers' certificates carry (when addresses
    are IPs or container names the certificates do not list)."""
    ca: str
    cert: str | None = None
    key: str | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(_read(self.ca), _read(self.key) if self.key else None,
                                            _read(self.cert) if self.cert else None)

    def options(self) -> list[tuple[str, Any]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


_client_tls: ClientTLS | None = None


def set_client_tls(tls: ClientTLS | None) -> None:
    """This process's TLS settings for every channel it opens (set once at start, from --tls-ca)."""
    global _client_tls
    _client_tls = tls


class _StreamLimitInterceptor(grpc.ServerInterceptor):
    """Admits at most `limit` streaming calls (either direction) at once; the next one is answered
    RESOURCE_EXHAUSTED at once instead of waiting for a thread. Unary calls pass untouched."""

    def __init__(self, limit: int):
        self.limit = limit
        self._slots = threading.BoundedSemaphore(limit)

    def _admit(self, context: grpc.ServicerContext, method: str) -> None:
        if not self._slots.acquire(blocking=False):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"{method}: this server already serves {self.limit} open streams (its --max-streams); "
                          f"close one or retry later")
        released = threading.Event()

        def release() -> None:   # once, when the call ends for any reason (finished, cancelled, deadline)
            if not released.is_set():
                released.set()
                self._slots.release()
        if not context.add_callback(release):
            release()

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or not (handler.request_streaming or handler.response_streaming):
            return handler
        method = details.method.rsplit("/", 1)[-1]
        admit = self._admit
        if handler.request_streaming and handler.response_streaming:
            inner = handler.stream_stream

            def stream_stream(request_iterator, context):
                admit(context, method)
                yield from inner(request_iterator, context)
            return grpc.stream_stream_rpc_method_handler(stream_stream, handler.request_deserializer,
                                                         handler.response_serializer)
        if handler.request_streaming:
            inner_su = handler.stream_unary

            def stream_unary(request_iterator, context):
                admit(context, method)
                return inner_su(request_iterator, context)
            return grpc.stream_unary_rpc_method_handler(stream_unary, handler.request_deserializer,
                                                        handler.response_serializer)
        inner_us = handler.unary_stream

        def unary_stream(request, context):
            admit(context, method)
            yield from inner_us(request, context)
        return grpc.unary_stream_rpc_method_handler(unary_stream, handler.request_deserializer,
                                                    handler.response_serializer)


class Server:
    """A started gRPC server with reflection and grpc.health.v1, serving on `port`.

    Beyond loopback it refuses to start without an auth token unless `insecure_no_auth` (which logs a
    warning). `tls` serves TLS (mutual with `tls.client_ca`). `worker_secret` guards every method of
    the registered services except `open_methods` (full method names): a worker's steering calls.
    `max_message_mb` bounds every message it receives or sends; `max_streams` bounds the streaming
    calls open at once (each holds one of the `max_workers` threads), so streams can never take the
    threads that registration, health checks and control calls need; `max_calls` bounds the calls
    in progress or queued for a thread (gRPC's maximum_concurrent_rpcs), so a flood of unary calls
    is refused at once instead of piling up in memory and delaying everyone else's calls.
    `health_port` (> 0) serves the health service alone, in plaintext, on 127.0.0.1 (see --health-port)."""

    def __init__(self, registrations: Iterable[tuple[Callable, Any, str]], *, host: str = "localhost",
                 port: int = 0, max_message_mb: int = DEFAULT_MAX_MESSAGE_MB, max_workers: int = DEFAULT_MAX_WORKERS,
                 max_streams: int = DEFAULT_MAX_STREAMS, max_calls: int = DEFAULT_MAX_CALLS, health_port: int = 0,
                 auth_token: str | None = None, tls: ServerTLS | None = None,
                 insecure_no_auth: bool = False, worker_secret: str | None = None, open_methods: Iterable[str] = ()):
        if not 1 <= max_message_mb <= 2047:   # gRPC's limits are int32 bytes
            raise ValueError(f"--max-message-mb must be between 1 and 2047, got {max_message_mb}")
        if not 1 <= max_streams < max_workers:
            raise ValueError(f"--max-streams must be between 1 and {max_workers - 1} (the server's threads minus "
                             f"one, so unary calls always find a thread), got {max_streams}")
        if max_calls < max_workers:
            raise ValueError(f"--max-calls must be at least the server's {max_workers} threads, got {max_calls}")
        token = os.environ.get(AUTH_ENV) if auth_token is None else auth_token
        registrations = list(registrations)
        if not is_loopback(host):
            if not token and not insecure_no_auth:
                raise InsecureServer(f"refusing to serve on {host}:{port} (beyond loopback) without an auth token: "
                                     f"set {AUTH_ENV}, bind --host localhost, or pass --insecure-no-auth to accept "
                                     f"any caller")
            if not token:
                log.warning("serving on %s:%s with NO authentication (--insecure-no-auth): anyone who reaches "
                            "this port can call every RPC", host, port)
            elif tls is None:
                log.warning("serving on %s:%s without TLS: the bearer token crosses the network in clear "
                            "(--tls-cert/--tls-key)", host, port)
        interceptors: list[grpc.ServerInterceptor] = []
        if token or worker_secret is not None:
            interceptors.append(_AuthInterceptor(token, worker_secret, [name for _, _, name in registrations],
                                                 open_methods))
        interceptors.append(_StreamLimitInterceptor(max_streams))   # last: only calls that passed auth take a slot
        self.max_message_mb = max_message_mb
        # no SO_REUSEPORT (gRPC's default on Linux): a second server on a port in use fails to bind
        # instead of silently taking half of the connections
        self.grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers),
                                options=channel_options(max_message_mb) + [("grpc.so_reuseport", 0)],
                                interceptors=interceptors, maximum_concurrent_rpcs=max_calls)
        names = []
        for add_fn, servicer, full_name in registrations:
            add_fn(servicer, self.grpc)
            names.append(full_name)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        names += [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
        reflection.enable_server_reflection(names, self.grpc)
        address = f"{host}:{port}"
        self.port = _bind(lambda: self.grpc.add_secure_port(address, tls.credentials()) if tls is not None
                          else self.grpc.add_insecure_port(address), f"{address} (--port/--host)")
        self.health_grpc = self.health_port = None
        if health_port:   # loopback only and health only: what it says is what the main port's health says
            self.health_grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=2), maximum_concurrent_rpcs=8,
                                           interceptors=[_StreamLimitInterceptor(1)],
                                           options=[("grpc.so_reuseport", 0)])
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_grpc)
            self.health_port = _bind(lambda: self.health_grpc.add_insecure_port(f"127.0.0.1:{health_port}"),
                                     f"127.0.0.1:{health_port} (--health-port)")
        self.grpc.start()
        if self.health_grpc is not None:
            self.health_grpc.start()
        for name in names[:-2] + [""]:
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace: float = 1.0) -> None:
        self.health.enter_graceful_shutdown()
        if self.health_grpc is not None:
            self.health_grpc.stop(0)
        self.grpc.stop(grace).wait()

    def wait(self) -> None:
        self.grpc.wait_for_termination()


def _bind(add_port: Callable[[], int], what: str) -> int:
    """The port add_port bound; gRPC reports a port in use as 0 or as a RuntimeError, by version."""
    try:
        port = add_port()
    except RuntimeError:
        port = 0
    if port == 0:
        raise RuntimeError(f"could not bind {what}: the port is in use or the address is not this host's")
    return port


class _MetadataClientInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                                 grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds fixed metadata (the auth token, a worker's secret) to every call."""

    def __init__(self, metadata: list[tuple[str, str]]):
        self._md = metadata

    def _details(self, details):
        md = list(details.metadata or []) + self._md
        return details._replace(metadata=md) if hasattr(details, "_replace") else _Details(details, md)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


class _Details(grpc.ClientCallDetails):
    def __init__(self, base, metadata):
        self.method, self.timeout, self.credentials = base.method, base.timeout, base.credentials
        self.wait_for_ready, self.compression = base.wait_for_ready, base.compression
        self.metadata = metadata


def _raw_channel(address: str, options: list[tuple[str, Any]], tls: ClientTLS | None) -> grpc.Channel:
    tls = tls if tls is not None else _client_tls
    if tls is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, tls.credentials(), options=options + tls.options())


def make_channel(address: str, *, max_message_mb: int = DEFAULT_MAX_MESSAGE_MB,
                 auth_token: str | None = None, worker_secret: str | None = None,
                 tls: ClientTLS | None = None) -> grpc.Channel:
    """A channel with our message limits, over TLS when `tls` (or the process's set_client_tls) is
    given; adds the auth token when one is set and `worker_secret` to steer a worker."""
    channel = _raw_channel(address, channel_options(max_message_mb), tls)
    token = os.environ.get(AUTH_ENV) if auth_token is None else auth_token
    metadata = ([("authorization", f"Bearer {token}")] if token else []) + \
        ([(WORKER_SECRET_KEY, worker_secret)] if worker_secret else [])
    return grpc.intercept_channel(channel, _MetadataClientInterceptor(metadata)) if metadata else channel


def wait_healthy(address: str, timeout: float = 30.0, tls: ClientTLS | None = None) -> None:
    """Blocks until the server at `address` answers SERVING to a health check."""
    with _raw_channel(address, [], tls) as channel:
        grpc.channel_ready_future(channel).result(timeout=timeout)
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            raise RuntimeError(f"{address} is not serving ({reply.status})")


class ResourceExhausted(RpcError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
