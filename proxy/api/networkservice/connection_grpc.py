import purerpc
import proxy.api.networkservice.connection_pb2 as proxy_dot_api_dot_networkservice_dot_connection__pb2
import google.protobuf.timestamp_pb2 as google_dot_protobuf_dot_timestamp__pb2
import proxy.api.networkservice.connectioncontext_pb2 as proxy_dot_api_dot_networkservice_dot_connectioncontext__pb2


class MonitorConnectionServicer(purerpc.Servicer):
    async def MonitorConnections(self, input_message):
        raise NotImplementedError()

    @property
    def service(self) -> purerpc.Service:
        service_obj = purerpc.Service(
            "connection.MonitorConnection"
        )
        service_obj.add_method(
            "MonitorConnections",
            self.MonitorConnections,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_STREAM,
                proxy_dot_api_dot_networkservice_dot_connection__pb2.MonitorScopeSelector,
                proxy_dot_api_dot_networkservice_dot_connection__pb2.ConnectionEvent,
            )
        )
        return service_obj


class MonitorConnectionStub:
    def __init__(self, channel):
        self._client = purerpc.Client(
            "connection.MonitorConnection",
            channel
        )
        self.MonitorConnections = self._client.get_method_stub(
            "MonitorConnections",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_STREAM,
                proxy_dot_api_dot_networkservice_dot_connection__pb2.MonitorScopeSelector,
                proxy_dot_api_dot_networkservice_dot_connection__pb2.ConnectionEvent,
            )
        )