import purerpc
import proxy.api.nsp.v1.targetregistry_pb2 as proxy_dot_api_dot_nsp_dot_v1_dot_targetregistry__pb2
import google.protobuf.empty_pb2 as google_dot_protobuf_dot_empty__pb2
import proxy.api.nsp.v1.model_pb2 as proxy_dot_api_dot_nsp_dot_v1_dot_model__pb2


class TargetRegistryServicer(purerpc.Servicer):
    async def Register(self, input_message):
        raise NotImplementedError()

    async def Unregister(self, input_message):
        raise NotImplementedError()

    async def Watch(self, input_message):
        raise NotImplementedError()

    @property
    def service(self) -> purerpc.Service:
        service_obj = purerpc.Service(
            "nsp.v1.TargetRegistry"
        )
        service_obj.add_method(
            "Register",
            self.Register,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                proxy_dot_api_dot_nsp_dot_v1_dot_targetregistry__pb2.Target,
                google_dot_protobuf_dot_empty__pb2.Empty,
            )
        )
        service_obj.add_method(
            "Unregister",
            self.Unregister,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                proxy_dot_api_dot_nsp_dot_v1_dot_targetregistry__pb2.Target,
                google_dot_protobuf_dot_empty__pb2.Empty,
            )
        )
        service_obj.add_method(
            "Watch",
            self.Watch,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_STREAM,
                proxy_dot_api_dot_nsp_dot_v1_dot_targetregistry__pb2.Target,
                proxy_dot_api_dot_nsp_dot_v1_dot_targetregistry__pb2.TargetResponse,
            )
        )
        return service_obj


class TargetRegistryStub:
    def __init__(self, channel):
        self._client = purerpc.Client(
            "nsp.v1.TargetRegistry",
            channel
        )
        self.Register = self._client.get_method_stub(
            "Register",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                proxy_dot_api_dot_nsp_dot_v1_dot_targetregistry__pb2.Target,
                google_dot_protobuf_dot_empty__pb2.Empty,
            )
        )
        self.Unregister = self._client.get_method_stub(
            "Unregister",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                proxy_dot_api_dot_nsp_dot_v1_dot_targetregistry__pb2.Target,
                google_dot_protobuf_dot_empty__pb2.Empty,
            )
        )
        self.Watch = self._client.get_method_stub(
            "Watch",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_STREAM,
                proxy_dot_api_dot_nsp_dot_v1_dot_targetregistry__pb2.Target,
                proxy_dot_api_dot_nsp_dot_v1_dot_targetregistry__pb2.TargetResponse,
            )
        )