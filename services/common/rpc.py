"""gRPC plumbing shared by the three services: servers with reflection, health, auth and
deliberate message limits; channels that carry the auth token; errors mapped to status codes."""
from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import threading
from concurrent import futures
from typing import Any, Callable, Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

log = logging.getLogger(__name__)

AUTH_ENV = "RLGRID_AUTH_TOKEN"
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


def add_limit_args(parser) -> None:
    """The command-line flags of Server's limits, shared by the three services."""
    parser.add_argument("--max-message-mb", type=int, default=DEFAULT_MAX_MESSAGE_MB,
                        help=f"largest gRPC message sent or received, MiB (default ${MAX_MESSAGE_ENV} or 64); "
                             f"the coordinator uses the smallest of its own and each worker's")
    parser.add_argument("--max-streams", type=int, default=DEFAULT_MAX_STREAMS,
                        help="streaming calls (WatchRun, Generate, Train, ...) open at once; more are answered "
                             "RESOURCE_EXHAUSTED")


def channel_options(max_message_mb: int = DEFAULT_MAX_MESSAGE_MB) -> list[tuple[str, Any]]:
    limit = max_message_mb * 1024 * 1024
    return [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]


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
    """Requires `authorization: Bearer <token>` on every RPC except health checks."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}"

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          f"missing or wrong 'authorization: Bearer <token>' metadata (token set by {AUTH_ENV})")
        self._deny = deny

    def intercept_service(self, continuation, details):
        if details.method.startswith(_HEALTH_PREFIX):
            return continuation(details)
        if dict(details.invocation_metadata or ()).get("authorization") == self._expected:
            return continuation(details)
        handler = continuation(details)
        if handler is None:
            return None
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(lambda it, ctx: self._deny(None, ctx))
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(lambda it, ctx: self._deny(None, ctx))
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(self._deny)
        return grpc.unary_unary_rpc_method_handler(self._deny)


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

    `max_message_mb` bounds every message it receives or sends; `max_streams` bounds the streaming
    calls open at once (each holds one of the `max_workers` threads), so streams can never take the
    threads that registration, health checks and control calls need."""

    def __init__(self, registrations: Iterable[tuple[Callable, Any, str]], *, host: str = "0.0.0.0",
                 port: int = 0, max_message_mb: int = DEFAULT_MAX_MESSAGE_MB, max_workers: int = DEFAULT_MAX_WORKERS,
                 max_streams: int = DEFAULT_MAX_STREAMS, auth_token: str | None = None):
        if not 1 <= max_message_mb <= 2047:   # gRPC's limits are int32 bytes
            raise ValueError(f"--max-message-mb must be between 1 and 2047, got {max_message_mb}")
        if not 1 <= max_streams < max_workers:
            raise ValueError(f"--max-streams must be between 1 and {max_workers - 1} (the server's threads minus "
                             f"one, so unary calls always find a thread), got {max_streams}")
        token = os.environ.get(AUTH_ENV) if auth_token is None else auth_token
        interceptors = [_AuthInterceptor(token)] if token else []
        interceptors.append(_StreamLimitInterceptor(max_streams))
        self.max_message_mb = max_message_mb
        self.grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers),
                                options=channel_options(max_message_mb), interceptors=interceptors)
        names = []
        for add_fn, servicer, full_name in registrations:
            add_fn(servicer, self.grpc)
            names.append(full_name)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        names += [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
        reflection.enable_server_reflection(names, self.grpc)
        self.port = self.grpc.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise RuntimeError(f"could not bind {host}:{port}")
        self.grpc.start()
        for name in names[:-2] + [""]:
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace: float = 1.0) -> None:
        self.health.enter_graceful_shutdown()
        self.grpc.stop(grace).wait()

    def wait(self) -> None:
        self.grpc.wait_for_termination()


class _TokenClientInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                              grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, token: str):
        self._md = ("authorization", f"Bearer {token}")

    def _details(self, details):
        md = list(details.metadata or []) + [self._md]
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


def make_channel(address: str, *, max_message_mb: int = DEFAULT_MAX_MESSAGE_MB,
                 auth_token: str | None = None) -> grpc.Channel:
    """An insecure channel with our message limits; adds the auth token when one is set."""
    channel = grpc.insecure_channel(address, options=channel_options(max_message_mb))
    token = os.environ.get(AUTH_ENV) if auth_token is None else auth_token
    return grpc.intercept_channel(channel, _TokenClientInterceptor(token)) if token else channel


def wait_healthy(address: str, timeout: float = 30.0) -> None:
    """Blocks until the server at `address` answers SERVING to a health check."""
    with grpc.insecure_channel(address) as channel:
        grpc.channel_ready_future(channel).result(timeout=timeout)
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            raise RuntimeError(f"{address} is not serving ({reply.status})")


class ResourceExhausted(RpcError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
