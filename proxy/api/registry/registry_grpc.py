import purerpc
import proxy.api.registry.registry_pb2 as proxy_dot_api_dot_registry_dot_registry__pb2
import google.protobuf.empty_pb2 as google_dot_protobuf_dot_empty__pb2
import google.protobuf.timestamp_pb2 as google_dot_protobuf_dot_timestamp__pb2


class NetworkServiceEndpointRegistryServicer(purerpc.Servicer):
    async def Register(self, input_message):
        raise NotImplementedError()

    async def Find(self, input_message):
        raise NotImplementedError()

    async def Unregister(self, input_message):
        raise NotImplementedError()

    @property
    def service(self) -> purerpc.Service:
        service_obj = purerpc.Service(
            "registry.NetworkServiceEndpointRegistry"
        )
        service_obj.add_method(
            "Register",
            self.Register,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                proxy_dot_api_dot_registry_dot_registry__pb2.NetworkServiceEndpoint,
                proxy_dot_api_dot_registry_dot_registry__pb2.NetworkServiceEndpoint,
            )
        )
        service_obj.add_method(
            "Find",
            self.Find,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_STREAM,
                proxy_dot_api_dot_registry_dot_registry__pb2.NetworkServiceEndpointQuery,
                proxy_dot_api_dot_registry_dot_registry__pb2.NetworkServiceEndpointResponse,
            )
        )
        service_obj.add_method(
            "Unregister",
            self.Unregister,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                proxy_dot_api_dot_registry_dot_registry__pb2.NetworkServiceEndpoint,
                google_dot_protobuf_dot_empty__pb2.Empty,
            )
        )
        return service_obj


class NetworkServiceEndpointRegistryStub:
    def __init__(self, channel):
        self._client = purerpc.Client(
            "registry.NetworkServiceEndpointRegistry",
            channel
        )
        self.Register = self._client.get_method_stub(
            "Register",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                proxy_dot_api_dot_registry_dot_registry__pb2.NetworkServiceEndpoint,
                proxy_dot_api_dot_registry_dot_registry__pb2.NetworkServiceEndpoint,
            )
        )
        self.Find = self._client.get_method_stub(
            "Find",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_STREAM,
                proxy_dot_api_dot_registry_dot_registry__pb2.NetworkServiceEndpointQuery,
                proxy_dot_api_dot_registry_dot_registry__pb2.NetworkServiceEndpointResponse,
            )
        )
        self.Unregister = self._client.get_method_stub(
            "Unregister",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                proxy_dot_api_dot_registry_dot_registry__pb2.NetworkServiceEndpoint,
                google_dot_protobuf_dot_empty__pb2.Empty,
            )
        )


class NetworkServiceRegistryServicer(purerpc.Servicer):
    async def Register(self, input_message):
        raise NotImplementedError()

    async def Find(self, input_message):
        raise NotImplementedError()

    async def Unregister(self, input_message):
        raise NotImplementedError()

    @property
    def service(self) -> purerpc.Service:
        service_obj = purerpc.Service(
            "registry.NetworkServiceRegistry"
        )
        service_obj.add_method(
            "Register",
            self.Register,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                proxy_dot_api_dot_registry_dot_registry__pb2.NetworkService,
                proxy_dot_api_dot_registry_dot_registry__pb2.NetworkService,
            )
        )
        service_obj.add_method(
            "Find",
            self.Find,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_STREAM,
                proxy_dot_api_dot_registry_dot_registry__pb2.NetworkServiceQuery,
                proxy_dot_api_dot_registry_dot_registry__pb2.NetworkServiceResponse,
            )
        )
        service_obj.add_method(
            "Unregister",
            self.Unregister,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                proxy_dot_api_dot_registry_dot_registry__pb2.NetworkService,
                google_dot_protobuf_dot_empty__pb2.Empty,
            )
        )
        return service_obj


class NetworkServiceRegistryStub:
    def __init__(self, channel):
        self._client = purerpc.Client(
            "registry.NetworkServiceRegistry",
            channel
        )
        self.Register = self._client.get_method_stub(
            "Register",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                proxy_dot_api_dot_registry_dot_registry__pb2.NetworkService,
                proxy_dot_api_dot_registry_dot_registry__pb2.NetworkService,
            )
        )
        self.Find = self._client.get_method_stub(
            "Find",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_STREAM,
                proxy_dot_api_dot_registry_dot_registry__pb2.NetworkServiceQuery,
                proxy_dot_api_dot_registry_dot_registry__pb2.NetworkServiceResponse,
            )
        )
        self.Unregister = self._client.get_method_stub(
            "Unregister",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                proxy_dot_api_dot_registry_dot_registry__pb2.NetworkService,
                google_dot_protobuf_dot_empty__pb2.Empty,
            )
        )