import purerpc
import proxy.api.networkservice.networkservice_pb2 as proxy_dot_api_dot_networkservice_dot_networkservice__pb2
import google.protobuf.empty_pb2 as google_dot_protobuf_dot_empty__pb2
import proxy.api.networkservice.connection_pb2 as proxy_dot_api_dot_networkservice_dot_connection__pb2


class NetworkServiceServicer(purerpc.Servicer):
    async def Request(self, input_message):
        raise NotImplementedError()

    async def Close(self, input_message):
        raise NotImplementedError()

    @property
    def service(self) -> purerpc.Service:
        service_obj = purerpc.Service(
            "networkservice.NetworkService"
        )
        service_obj.add_method(
            "Request",
            self.Request,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                proxy_dot_api_dot_networkservice_dot_networkservice__pb2.NetworkServiceRequest,
                proxy_dot_api_dot_networkservice_dot_connection__pb2.Connection,
            )
        )
        service_obj.add_method(
            "Close",
            self.Close,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                proxy_dot_api_dot_networkservice_dot_connection__pb2.Connection,
                google_dot_protobuf_dot_empty__pb2.Empty,
            )
        )
        return service_obj


class NetworkServiceStub:
    def __init__(self, channel):
        self._client = purerpc.Client(
            "networkservice.NetworkService",
            channel
        )
        self.Request = self._client.get_method_stub(
            "Request",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                proxy_dot_api_dot_networkservice_dot_networkservice__pb2.NetworkServiceRequest,
                proxy_dot_api_dot_networkservice_dot_connection__pb2.Connection,
            )
        )
        self.Close = self._client.get_method_stub(
            "Close",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                proxy_dot_api_dot_networkservice_dot_connection__pb2.Connection,
                google_dot_protobuf_dot_empty__pb2.Empty,
            )
        )