from rlgrid.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SleepRequest(_message.Message):
    __slots__ = ("level",)
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    level: int
    def __init__(self, level: _Optional[int] = ...) -> None: ...

class WakeUpRequest(_message.Message):
    __slots__ = ("tags",)
    TAGS_FIELD_NUMBER: _ClassVar[int]
    tags: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, tags: _Optional[_Iterable[str]] = ...) -> None: ...

class Prompt(_message.Message):
    __slots__ = ("group_id", "prompt_ids")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    prompt_ids: _common_pb2.Tensor
    def __init__(self, group_id: _Optional[str] = ..., prompt_ids: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompts", "sampling", "n")
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    prompts: _containers.RepeatedCompositeFieldContainer[Prompt]
    sampling: _common_pb2.SamplingParams
    n: int
    def __init__(self, prompts: _Optional[_Iterable[_Union[Prompt, _Mapping]]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., n: _Optional[int] = ...) -> None: ...

class RolloutInfo(_message.Message):
    __slots__ = ("engine", "model", "policy_version", "device", "params", "vocab_size", "eos_token_id", "dtype", "run_id", "sync_ranks", "gpu_uuids", "max_message_mb", "sleep_level", "weights_valid")
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SYNC_RANKS_FIELD_NUMBER: _ClassVar[int]
    GPU_UUIDS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_MB_FIELD_NUMBER: _ClassVar[int]
    SLEEP_LEVEL_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_VALID_FIELD_NUMBER: _ClassVar[int]
    engine: str
    model: str
    policy_version: int
    device: str
    params: _containers.RepeatedCompositeFieldContainer[_common_pb2.ParamSpec]
    vocab_size: int
    eos_token_id: int
    dtype: str
    run_id: str
    sync_ranks: int
    gpu_uuids: _containers.RepeatedScalarFieldContainer[str]
    max_message_mb: int
    sleep_level: int
    weights_valid: bool
    def __init__(self, engine: _Optional[str] = ..., model: _Optional[str] = ..., policy_version: _Optional[int] = ..., device: _Optional[str] = ..., params: _Optional[_Iterable[_Union[_common_pb2.ParamSpec, _Mapping]]] = ..., vocab_size: _Optional[int] = ..., eos_token_id: _Optional[int] = ..., dtype: _Optional[str] = ..., run_id: _Optional[str] = ..., sync_ranks: _Optional[int] = ..., gpu_uuids: _Optional[_Iterable[str]] = ..., max_message_mb: _Optional[int] = ..., sleep_level: _Optional[int] = ..., weights_valid: bool = ...) -> None: ...
