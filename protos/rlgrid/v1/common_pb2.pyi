from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
    FLOAT64: _ClassVar[DType]
    INT64: _ClassVar[DType]
    INT32: _ClassVar[DType]
    INT16: _ClassVar[DType]
    INT8: _ClassVar[DType]
    UINT8: _ClassVar[DType]
    BOOL: _ClassVar[DType]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    STOP: _ClassVar[FinishReason]
    LENGTH: _ClassVar[FinishReason]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT16: DType
BFLOAT16: DType
FLOAT64: DType
INT64: DType
INT32: DType
INT16: DType
INT8: DType
UINT8: DType
BOOL: DType
FINISH_REASON_UNSPECIFIED: FinishReason
STOP: FinishReason
LENGTH: FinishReason

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "max_tokens", "stop_token_ids", "seed")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    max_tokens: int
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    seed: int
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., max_tokens: _Optional[int] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., seed: _Optional[int] = ...) -> None: ...

class Sample(_message.Message):
    __slots__ = ("sample_id", "group_id", "prompt_ids", "response_ids", "response_logprobs", "finish_reason", "policy_version", "replica")
    SAMPLE_ID_FIELD_NUMBER: _ClassVar[int]
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_IDS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    sample_id: str
    group_id: str
    prompt_ids: Tensor
    response_ids: Tensor
    response_logprobs: Tensor
    finish_reason: FinishReason
    policy_version: int
    replica: str
    def __init__(self, sample_id: _Optional[str] = ..., group_id: _Optional[str] = ..., prompt_ids: _Optional[_Union[Tensor, _Mapping]] = ..., response_ids: _Optional[_Union[Tensor, _Mapping]] = ..., response_logprobs: _Optional[_Union[Tensor, _Mapping]] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., policy_version: _Optional[int] = ..., replica: _Optional[str] = ...) -> None: ...

class PackedBatch(_message.Message):
    __slots__ = ("input_ids", "cu_seqlens", "loss_mask", "old_logprobs", "advantages", "versions", "num_global_tokens", "temperature", "padded", "step", "proximal_logprobs")
    INPUT_IDS_FIELD_NUMBER: _ClassVar[int]
    CU_SEQLENS_FIELD_NUMBER: _ClassVar[int]
    LOSS_MASK_FIELD_NUMBER: _ClassVar[int]
    OLD_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    ADVANTAGES_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    NUM_GLOBAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    PADDED_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    PROXIMAL_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    input_ids: Tensor
    cu_seqlens: Tensor
    loss_mask: Tensor
    old_logprobs: Tensor
    advantages: Tensor
    versions: Tensor
    num_global_tokens: int
    temperature: float
    padded: bool
    step: int
    proximal_logprobs: Tensor
    def __init__(self, input_ids: _Optional[_Union[Tensor, _Mapping]] = ..., cu_seqlens: _Optional[_Union[Tensor, _Mapping]] = ..., loss_mask: _Optional[_Union[Tensor, _Mapping]] = ..., old_logprobs: _Optional[_Union[Tensor, _Mapping]] = ..., advantages: _Optional[_Union[Tensor, _Mapping]] = ..., versions: _Optional[_Union[Tensor, _Mapping]] = ..., num_global_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., padded: bool = ..., step: _Optional[int] = ..., proximal_logprobs: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ParamSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class WeightSyncPlan(_message.Message):
    __slots__ = ("group_id", "transport", "backend", "rendezvous_host", "rendezvous_port", "world_size", "rank", "params", "bucket_bytes", "timeout_s", "secret")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    RENDEZVOUS_HOST_FIELD_NUMBER: _ClassVar[int]
    RENDEZVOUS_PORT_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    BUCKET_BYTES_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    transport: str
    backend: str
    rendezvous_host: str
    rendezvous_port: int
    world_size: int
    rank: int
    params: _containers.RepeatedCompositeFieldContainer[ParamSpec]
    bucket_bytes: int
    timeout_s: int
    secret: str
    def __init__(self, group_id: _Optional[str] = ..., transport: _Optional[str] = ..., backend: _Optional[str] = ..., rendezvous_host: _Optional[str] = ..., rendezvous_port: _Optional[int] = ..., world_size: _Optional[int] = ..., rank: _Optional[int] = ..., params: _Optional[_Iterable[_Union[ParamSpec, _Mapping]]] = ..., bucket_bytes: _Optional[int] = ..., timeout_s: _Optional[int] = ..., secret: _Optional[str] = ...) -> None: ...

class SharedBuffer(_message.Message):
    __slots__ = ("sequence", "nbytes", "gpu_uuid", "error", "probe", "cuda", "host")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    GPU_UUID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    PROBE_FIELD_NUMBER: _ClassVar[int]
    CUDA_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    nbytes: int
    gpu_uuid: str
    error: str
    probe: bytes
    cuda: CudaIpcHandle
    host: HostShmHandle
    def __init__(self, sequence: _Optional[int] = ..., nbytes: _Optional[int] = ..., gpu_uuid: _Optional[str] = ..., error: _Optional[str] = ..., probe: _Optional[bytes] = ..., cuda: _Optional[_Union[CudaIpcHandle, _Mapping]] = ..., host: _Optional[_Union[HostShmHandle, _Mapping]] = ...) -> None: ...

class CudaIpcHandle(_message.Message):
    __slots__ = ("mem_handle", "storage_bytes", "offset_bytes", "ref_counter", "ref_counter_offset", "event_handle", "event_sync_required")
    MEM_HANDLE_FIELD_NUMBER: _ClassVar[int]
    STORAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    OFFSET_BYTES_FIELD_NUMBER: _ClassVar[int]
    REF_COUNTER_FIELD_NUMBER: _ClassVar[int]
    REF_COUNTER_OFFSET_FIELD_NUMBER: _ClassVar[int]
    EVENT_HANDLE_FIELD_NUMBER: _ClassVar[int]
    EVENT_SYNC_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    mem_handle: bytes
    storage_bytes: int
    offset_bytes: int
    ref_counter: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool
    def __init__(self, mem_handle: _Optional[bytes] = ..., storage_bytes: _Optional[int] = ..., offset_bytes: _Optional[int] = ..., ref_counter: _Optional[bytes] = ..., ref_counter_offset: _Optional[int] = ..., event_handle: _Optional[bytes] = ..., event_sync_required: bool = ...) -> None: ...

class HostShmHandle(_message.Message):
    __slots__ = ("manager", "filename", "storage_bytes")
    MANAGER_FIELD_NUMBER: _ClassVar[int]
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    STORAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    manager: bytes
    filename: bytes
    storage_bytes: int
    def __init__(self, manager: _Optional[bytes] = ..., filename: _Optional[bytes] = ..., storage_bytes: _Optional[int] = ...) -> None: ...

class MemoryReport(_message.Message):
    __slots__ = ("device_used_gib", "device_total_gib", "allocated_gib", "reserved_gib", "peak_allocated_gib")
    DEVICE_USED_GIB_FIELD_NUMBER: _ClassVar[int]
    DEVICE_TOTAL_GIB_FIELD_NUMBER: _ClassVar[int]
    ALLOCATED_GIB_FIELD_NUMBER: _ClassVar[int]
    RESERVED_GIB_FIELD_NUMBER: _ClassVar[int]
    PEAK_ALLOCATED_GIB_FIELD_NUMBER: _ClassVar[int]
    device_used_gib: float
    device_total_gib: float
    allocated_gib: float
    reserved_gib: float
    peak_allocated_gib: float
    def __init__(self, device_used_gib: _Optional[float] = ..., device_total_gib: _Optional[float] = ..., allocated_gib: _Optional[float] = ..., reserved_gib: _Optional[float] = ..., peak_allocated_gib: _Optional[float] = ...) -> None: ...

class WeightSyncRequest(_message.Message):
    __slots__ = ("group_id", "version")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    version: int
    def __init__(self, group_id: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class WeightSyncReply(_message.Message):
    __slots__ = ("version", "bytes", "seconds")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    version: int
    bytes: int
    seconds: float
    def __init__(self, version: _Optional[int] = ..., bytes: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class SetupRequest(_message.Message):
    __slots__ = ("run_id", "config_yaml")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_YAML_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    config_yaml: str
    def __init__(self, run_id: _Optional[str] = ..., config_yaml: _Optional[str] = ...) -> None: ...

class Empty(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
