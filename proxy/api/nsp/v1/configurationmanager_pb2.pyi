from proxy.api.nsp.v1 import model_pb2 as _model_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TrenchResponse(_message.Message):
    __slots__ = ("trench",)
    TRENCH_FIELD_NUMBER: _ClassVar[int]
    trench: _model_pb2.Trench
    def __init__(self, trench: _Optional[_Union[_model_pb2.Trench, _Mapping]] = ...) -> None: ...

class ConduitResponse(_message.Message):
    __slots__ = ("conduits",)
    CONDUITS_FIELD_NUMBER: _ClassVar[int]
    conduits: _containers.RepeatedCompositeFieldContainer[_model_pb2.Conduit]
    def __init__(self, conduits: _Optional[_Iterable[_Union[_model_pb2.Conduit, _Mapping]]] = ...) -> None: ...

class StreamResponse(_message.Message):
    __slots__ = ("streams",)
    STREAMS_FIELD_NUMBER: _ClassVar[int]
    streams: _containers.RepeatedCompositeFieldContainer[_model_pb2.Stream]
    def __init__(self, streams: _Optional[_Iterable[_Union[_model_pb2.Stream, _Mapping]]] = ...) -> None: ...

class FlowResponse(_message.Message):
    __slots__ = ("flows",)
    FLOWS_FIELD_NUMBER: _ClassVar[int]
    flows: _containers.RepeatedCompositeFieldContainer[_model_pb2.Flow]
    def __init__(self, flows: _Optional[_Iterable[_Union[_model_pb2.Flow, _Mapping]]] = ...) -> None: ...

class VipResponse(_message.Message):
    __slots__ = ("vips",)
    VIPS_FIELD_NUMBER: _ClassVar[int]
    vips: _containers.RepeatedCompositeFieldContainer[_model_pb2.Vip]
    def __init__(self, vips: _Optional[_Iterable[_Union[_model_pb2.Vip, _Mapping]]] = ...) -> None: ...

class AttractorResponse(_message.Message):
    __slots__ = ("attractors",)
    ATTRACTORS_FIELD_NUMBER: _ClassVar[int]
    attractors: _containers.RepeatedCompositeFieldContainer[_model_pb2.Attractor]
    def __init__(self, attractors: _Optional[_Iterable[_Union[_model_pb2.Attractor, _Mapping]]] = ...) -> None: ...

class GatewayResponse(_message.Message):
    __slots__ = ("gateways",)
    GATEWAYS_FIELD_NUMBER: _ClassVar[int]
    gateways: _containers.RepeatedCompositeFieldContainer[_model_pb2.Gateway]
    def __init__(self, gateways: _Optional[_Iterable[_Union[_model_pb2.Gateway, _Mapping]]] = ...) -> None: ...
