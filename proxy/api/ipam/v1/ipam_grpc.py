import purerpc
import proxy.api.ipam.v1.ipam_pb2 as proxy_dot_api_dot_ipam_dot_v1_dot_ipam__pb2
import google.protobuf.empty_pb2 as google_dot_protobuf_dot_empty__pb2
import proxy.api.nsp.v1.model_pb2 as proxy_dot_api_dot_nsp_dot_v1_dot_model__pb2


class IpamServicer(purerpc.Servicer):
    async def Allocate(self, input_message):
        raise NotImplementedError()

    async def Release(self, input_message):
        raise NotImplementedError()

    @property
    def service(self) -> purerpc.Service:
        service_obj = purerpc.Service(
            "ipam.v1.Ipam"
        )
        service_obj.add_method(
            "Allocate",
            self.Allocate,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                proxy_dot_api_dot_ipam_dot_v1_dot_ipam__pb2.Child,
                proxy_dot_api_dot_ipam_dot_v1_dot_ipam__pb2.Prefix,
            )
        )
        service_obj.add_method(
            "Release",
            self.Release,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                proxy_dot_api_dot_ipam_dot_v1_dot_ipam__pb2.Child,
                google_dot_protobuf_dot_empty__pb2.Empty,
            )
        )
        return service_obj


class IpamStub:
    def __init__(self, channel):
        self._client = purerpc.Client(
            "ipam.v1.Ipam",
            channel
        )
        self.Allocate = self._client.get_method_stub(
            "Allocate",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                proxy_dot_api_dot_ipam_dot_v1_dot_ipam__pb2.Child,
                proxy_dot_api_dot_ipam_dot_v1_dot_ipam__pb2.Prefix,
            )
        )
        self.Release = self._client.get_method_stub(
            "Release",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                proxy_dot_api_dot_ipam_dot_v1_dot_ipam__pb2.Child,
                google_dot_protobuf_dot_empty__pb2.Empty,
            )
        )