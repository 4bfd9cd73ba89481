import purerpc
import proxy.api.workload.workload_pb2 as proxy_dot_api_dot_workload_dot_workload__pb2


class SpiffeWorkloadAPIServicer(purerpc.Servicer):
    async def FetchX509SVID(self, input_message):
        raise NotImplementedError()

    async def FetchX509Bundles(self, input_message):
        raise NotImplementedError()

    @property
    def service(self) -> purerpc.Service:
        service_obj = purerpc.Service(
            "SpiffeWorkloadAPI"
        )
        service_obj.add_method(
            "FetchX509SVID",
            self.FetchX509SVID,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_STREAM,
                proxy_dot_api_dot_workload_dot_workload__pb2.X509SVIDRequest,
                proxy_dot_api_dot_workload_dot_workload__pb2.X509SVIDResponse,
            )
        )
        service_obj.add_method(
            "FetchX509Bundles",
            self.FetchX509Bundles,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_STREAM,
                proxy_dot_api_dot_workload_dot_workload__pb2.X509BundlesRequest,
                proxy_dot_api_dot_workload_dot_workload__pb2.X509BundlesResponse,
            )
        )
        return service_obj


class SpiffeWorkloadAPIStub:
    def __init__(self, channel):
        self._client = purerpc.Client(
            "SpiffeWorkloadAPI",
            channel
        )
        self.FetchX509SVID = self._client.get_method_stub(
            "FetchX509SVID",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_STREAM,
                proxy_dot_api_dot_workload_dot_workload__pb2.X509SVIDRequest,
                proxy_dot_api_dot_workload_dot_workload__pb2.X509SVIDResponse,
            )
        )
        self.FetchX509Bundles = self._client.get_method_stub(
            "FetchX509Bundles",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_STREAM,
                proxy_dot_api_dot_workload_dot_workload__pb2.X509BundlesRequest,
                proxy_dot_api_dot_workload_dot_workload__pb2.X509BundlesResponse,
            )
        )