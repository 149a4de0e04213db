from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SessionMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SESSION_MODE_UNSPECIFIED: _ClassVar[SessionMode]
    SESSION_MODE_TRAIN: _ClassVar[SessionMode]
    SESSION_MODE_INFERENCE: _ClassVar[SessionMode]
SESSION_MODE_UNSPECIFIED: SessionMode
SESSION_MODE_TRAIN: SessionMode
SESSION_MODE_INFERENCE: SessionMode

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "encoding", "data", "scales", "block_size")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    encoding: str
    data: bytes
    scales: bytes
    block_size: int
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., encoding: _Optional[str] = ..., data: _Optional[bytes] = ..., scales: _Optional[bytes] = ..., block_size: _Optional[int] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("model_id", "weights_fingerprint", "model_type", "num_layers", "trunk_start", "trunk_end", "hidden_size", "dtype", "max_sessions", "active_sessions", "version", "max_message_bytes", "session_ttl_s", "min_trunk_start", "max_trunk_end", "device", "memory_total_bytes", "memory_base_bytes", "memory_sessions_bytes", "max_lora_rank", "max_micro_batches", "max_tokens_per_request", "max_positions", "max_kv_tokens", "max_saved_graphs", "uptime_s", "sessions_opened", "sessions_closed", "sessions_expired", "tokens_processed", "busy_s", "adapter_methods", "max_session_memory_bytes")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    MODEL_TYPE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    TRUNK_START_FIELD_NUMBER: _ClassVar[int]
    TRUNK_END_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SESSION_TTL_S_FIELD_NUMBER: _ClassVar[int]
    MIN_TRUNK_START_FIELD_NUMBER: _ClassVar[int]
    MAX_TRUNK_END_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BASE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_SESSIONS_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    MAX_MICRO_BATCHES_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_KV_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_SAVED_GRAPHS_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_OPENED_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_CLOSED_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_EXPIRED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PROCESSED_FIELD_NUMBER: _ClassVar[int]
    BUSY_S_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_METHODS_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSION_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    weights_fingerprint: str
    model_type: str
    num_layers: int
    trunk_start: int
    trunk_end: int
    hidden_size: int
    dtype: str
    max_sessions: int
    active_sessions: int
    version: str
    max_message_bytes: int
    session_ttl_s: int
    min_trunk_start: int
    max_trunk_end: int
    device: str
    memory_total_bytes: int
    memory_base_bytes: int
    memory_sessions_bytes: int
    max_lora_rank: int
    max_micro_batches: int
    max_tokens_per_request: int
    max_positions: int
    max_kv_tokens: int
    max_saved_graphs: int
    uptime_s: float
    sessions_opened: int
    sessions_closed: int
    sessions_expired: int
    tokens_processed: int
    busy_s: float
    adapter_methods: _containers.RepeatedScalarFieldContainer[str]
    max_session_memory_bytes: int
    def __init__(self, model_id: _Optional[str] = ..., weights_fingerprint: _Optional[str] = ..., model_type: _Optional[str] = ..., num_layers: _Optional[int] = ..., trunk_start: _Optional[int] = ..., trunk_end: _Optional[int] = ..., hidden_size: _Optional[int] = ..., dtype: _Optional[str] = ..., max_sessions: _Optional[int] = ..., active_sessions: _Optional[int] = ..., version: _Optional[str] = ..., max_message_bytes: _Optional[int] = ..., session_ttl_s: _Optional[int] = ..., min_trunk_start: _Optional[int] = ..., max_trunk_end: _Optional[int] = ..., device: _Optional[str] = ..., memory_total_bytes: _Optional[int] = ..., memory_base_bytes: _Optional[int] = ..., memory_sessions_bytes: _Optional[int] = ..., max_lora_rank: _Optional[int] = ..., max_micro_batches: _Optional[int] = ..., max_tokens_per_request: _Optional[int] = ..., max_positions: _Optional[int] = ..., max_kv_tokens: _Optional[int] = ..., max_saved_graphs: _Optional[int] = ..., uptime_s: _Optional[float] = ..., sessions_opened: _Optional[int] = ..., sessions_closed: _Optional[int] = ..., sessions_expired: _Optional[int] = ..., tokens_processed: _Optional[int] = ..., busy_s: _Optional[float] = ..., adapter_methods: _Optional[_Iterable[str]] = ..., max_session_memory_bytes: _Optional[int] = ...) -> None: ...

class LoraSpec(_message.Message):
    __slots__ = ("r", "alpha", "dropout", "target_modules", "use_dora", "use_rslora", "seed", "method")
    R_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    DROPOUT_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    USE_DORA_FIELD_NUMBER: _ClassVar[int]
    USE_RSLORA_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    r: int
    alpha: float
    dropout: float
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    use_dora: bool
    use_rslora: bool
    seed: int
    method: str
    def __init__(self, r: _Optional[int] = ..., alpha: _Optional[float] = ..., dropout: _Optional[float] = ..., target_modules: _Optional[_Iterable[str]] = ..., use_dora: _Optional[bool] = ..., use_rslora: _Optional[bool] = ..., seed: _Optional[int] = ..., method: _Optional[str] = ...) -> None: ...

class OptimizerSpec(_message.Message):
    __slots__ = ("beta1", "beta2", "eps", "weight_decay")
    BETA1_FIELD_NUMBER: _ClassVar[int]
    BETA2_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    def __init__(self, beta1: _Optional[float] = ..., beta2: _Optional[float] = ..., eps: _Optional[float] = ..., weight_decay: _Optional[float] = ...) -> None: ...

class OpenSessionRequest(_message.Message):
    __slots__ = ("mode", "lora", "optimizer", "wire_encoding", "client_label", "dropout_seed", "trunk_start", "trunk_end", "open_key")
    MODE_FIELD_NUMBER: _ClassVar[int]
    LORA_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    WIRE_ENCODING_FIELD_NUMBER: _ClassVar[int]
    CLIENT_LABEL_FIELD_NUMBER: _ClassVar[int]
    DROPOUT_SEED_FIELD_NUMBER: _ClassVar[int]
    TRUNK_START_FIELD_NUMBER: _ClassVar[int]
    TRUNK_END_FIELD_NUMBER: _ClassVar[int]
    OPEN_KEY_FIELD_NUMBER: _ClassVar[int]
    mode: SessionMode
    lora: LoraSpec
    optimizer: OptimizerSpec
    wire_encoding: str
    client_label: str
    dropout_seed: int
    trunk_start: int
    trunk_end: int
    open_key: str
    def __init__(self, mode: _Optional[_Union[SessionMode, str]] = ..., lora: _Optional[_Union[LoraSpec, _Mapping]] = ..., optimizer: _Optional[_Union[OptimizerSpec, _Mapping]] = ..., wire_encoding: _Optional[str] = ..., client_label: _Optional[str] = ..., dropout_seed: _Optional[int] = ..., trunk_start: _Optional[int] = ..., trunk_end: _Optional[int] = ..., open_key: _Optional[str] = ...) -> None: ...

class OpenSessionResponse(_message.Message):
    __slots__ = ("session_id", "info")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    info: InfoResponse
    def __init__(self, session_id: _Optional[str] = ..., info: _Optional[_Union[InfoResponse, _Mapping]] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("session_id", "step", "micro_batch", "hidden", "attention_mask", "evaluate")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_MASK_FIELD_NUMBER: _ClassVar[int]
    EVALUATE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    step: int
    micro_batch: int
    hidden: Tensor
    attention_mask: Tensor
    evaluate: bool
    def __init__(self, session_id: _Optional[str] = ..., step: _Optional[int] = ..., micro_batch: _Optional[int] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., attention_mask: _Optional[_Union[Tensor, _Mapping]] = ..., evaluate: _Optional[bool] = ...) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("hidden",)
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    hidden: Tensor
    def __init__(self, hidden: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class BackwardRequest(_message.Message):
    __slots__ = ("session_id", "step", "micro_batch", "grad_output", "hidden", "attention_mask")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_FIELD_NUMBER: _ClassVar[int]
    GRAD_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_MASK_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    step: int
    micro_batch: int
    grad_output: Tensor
    hidden: Tensor
    attention_mask: Tensor
    def __init__(self, session_id: _Optional[str] = ..., step: _Optional[int] = ..., micro_batch: _Optional[int] = ..., grad_output: _Optional[_Union[Tensor, _Mapping]] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., attention_mask: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class BackwardResponse(_message.Message):
    __slots__ = ("grad_input", "trunk_grad_sq_norm")
    GRAD_INPUT_FIELD_NUMBER: _ClassVar[int]
    TRUNK_GRAD_SQ_NORM_FIELD_NUMBER: _ClassVar[int]
    grad_input: Tensor
    trunk_grad_sq_norm: float
    def __init__(self, grad_input: _Optional[_Union[Tensor, _Mapping]] = ..., trunk_grad_sq_norm: _Optional[float] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("session_id", "step", "lr", "clip_coef")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    CLIP_COEF_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    step: int
    lr: float
    clip_coef: float
    def __init__(self, session_id: _Optional[str] = ..., step: _Optional[int] = ..., lr: _Optional[float] = ..., clip_coef: _Optional[float] = ...) -> None: ...

class StepResponse(_message.Message):
    __slots__ = ("applied_step",)
    APPLIED_STEP_FIELD_NUMBER: _ClassVar[int]
    applied_step: int
    def __init__(self, applied_step: _Optional[int] = ...) -> None: ...

class ExportStateRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class ExportStateResponse(_message.Message):
    __slots__ = ("step", "safetensors")
    STEP_FIELD_NUMBER: _ClassVar[int]
    SAFETENSORS_FIELD_NUMBER: _ClassVar[int]
    step: int
    safetensors: bytes
    def __init__(self, step: _Optional[int] = ..., safetensors: _Optional[bytes] = ...) -> None: ...

class ImportStateRequest(_message.Message):
    __slots__ = ("session_id", "step", "safetensors")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    SAFETENSORS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    step: int
    safetensors: bytes
    def __init__(self, session_id: _Optional[str] = ..., step: _Optional[int] = ..., safetensors: _Optional[bytes] = ...) -> None: ...

class ImportStateResponse(_message.Message):
    __slots__ = ("step",)
    STEP_FIELD_NUMBER: _ClassVar[int]
    step: int
    def __init__(self, step: _Optional[int] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CloseSessionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
