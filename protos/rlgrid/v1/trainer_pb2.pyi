from rlgrid.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StepMetrics(_message.Message):
    __slots__ = ("step", "values")
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STEP_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    step: int
    values: _containers.ScalarMap[str, float]
    def __init__(self, step: _Optional[int] = ..., values: _Optional[_Mapping[str, float]] = ...) -> None: ...

class LogProbs(_message.Message):
    __slots__ = ("logprobs",)
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    logprobs: _common_pb2.Tensor
    def __init__(self, logprobs: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...

class CheckpointRequest(_message.Message):
    __slots__ = ("path", "step", "extra_json")
    PATH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    EXTRA_JSON_FIELD_NUMBER: _ClassVar[int]
    path: str
    step: int
    extra_json: str
    def __init__(self, path: _Optional[str] = ..., step: _Optional[int] = ..., extra_json: _Optional[str] = ...) -> None: ...

class CheckpointReply(_message.Message):
    __slots__ = ("path", "seconds", "step", "extra_json")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    EXTRA_JSON_FIELD_NUMBER: _ClassVar[int]
    path: str
    seconds: float
    step: int
    extra_json: str
    def __init__(self, path: _Optional[str] = ..., seconds: _Optional[float] = ..., step: _Optional[int] = ..., extra_json: _Optional[str] = ...) -> None: ...

class TrainerInfo(_message.Message):
    __slots__ = ("backend", "model", "step", "world_size", "device", "params", "run_id", "gpu_uuids", "max_message_mb", "offloaded")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    GPU_UUIDS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_MB_FIELD_NUMBER: _ClassVar[int]
    OFFLOADED_FIELD_NUMBER: _ClassVar[int]
    backend: str
    model: str
    step: int
    world_size: int
    device: str
    params: _containers.RepeatedCompositeFieldContainer[_common_pb2.ParamSpec]
    run_id: str
    gpu_uuids: _containers.RepeatedScalarFieldContainer[str]
    max_message_mb: int
    offloaded: bool
    def __init__(self, backend: _Optional[str] = ..., model: _Optional[str] = ..., step: _Optional[int] = ..., world_size: _Optional[int] = ..., device: _Optional[str] = ..., params: _Optional[_Iterable[_Union[_common_pb2.ParamSpec, _Mapping]]] = ..., run_id: _Optional[str] = ..., gpu_uuids: _Optional[_Iterable[str]] = ..., max_message_mb: _Optional[int] = ..., offloaded: bool = ...) -> None: ...
