import purerpc
import proxy.api.nsp.v1.configurationmanager_pb2 as proxy_dot_api_dot_nsp_dot_v1_dot_configurationmanager__pb2
import proxy.api.nsp.v1.model_pb2 as proxy_dot_api_dot_nsp_dot_v1_dot_model__pb2


class ConfigurationManagerServicer(purerpc.Servicer):
    async def WatchTrench(self, input_message):
        raise NotImplementedError()

    async def WatchConduit(self, input_message):
        raise NotImplementedError()

    async def WatchStream(self, input_message):
        raise NotImplementedError()

    async def WatchFlow(self, input_message):
        raise NotImplementedError()

    async def WatchVip(self, input_message):
        raise NotImplementedError()

    async def WatchAttractor(self, input_message):
        raise NotImplementedError()

    async def WatchGateway(self, input_message):
        raise NotImplementedError()

    @property
    def service(self) -> purerpc.Service:
        service_obj = purerpc.Service(
            "nsp.v1.ConfigurationManager"
        )
        service_obj.add_method(
            "WatchTrench",
            self.WatchTrench,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_STREAM,
                proxy_dot_api_dot_nsp_dot_v1_dot_model__pb2.Trench,
                proxy_dot_api_dot_nsp_dot_v1_dot_configurationmanager__pb2.TrenchResponse,
            )
        )
        service_obj.add_method(
            "WatchConduit",
            self.WatchConduit,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_STREAM,
                proxy_dot_api_dot_nsp_dot_v1_dot_model__pb2.Conduit,
                proxy_dot_api_dot_nsp_dot_v1_dot_configurationmanager__pb2.ConduitResponse,
            )
        )
        service_obj.add_method(
            "WatchStream",
            self.WatchStream,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_STREAM,
                proxy_dot_api_dot_nsp_dot_v1_dot_model__pb2.Stream,
                proxy_dot_api_dot_nsp_dot_v1_dot_configurationmanager__pb2.StreamResponse,
            )
        )
        service_obj.add_method(
            "WatchFlow",
            self.WatchFlow,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_STREAM,
                proxy_dot_api_dot_nsp_dot_v1_dot_model__pb2.Flow,
                proxy_dot_api_dot_nsp_dot_v1_dot_configurationmanager__pb2.FlowResponse,
            )
        )
        service_obj.add_method(
            "WatchVip",
            self.WatchVip,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_STREAM,
                proxy_dot_api_dot_nsp_dot_v1_dot_model__pb2.Vip,
                proxy_dot_api_dot_nsp_dot_v1_dot_configurationmanager__pb2.VipResponse,
            )
        )
        service_obj.add_method(
            "WatchAttractor",
            self.WatchAttractor,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_STREAM,
                proxy_dot_api_dot_nsp_dot_v1_dot_model__pb2.Attractor,
                proxy_dot_api_dot_nsp_dot_v1_dot_configurationmanager__pb2.AttractorResponse,
            )
        )
        service_obj.add_method(
            "WatchGateway",
            self.WatchGateway,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_STREAM,
                proxy_dot_api_dot_nsp_dot_v1_dot_model__pb2.Gateway,
                proxy_dot_api_dot_nsp_dot_v1_dot_configurationmanager__pb2.GatewayResponse,
            )
        )
        return service_obj


class ConfigurationManagerStub:
    def __init__(self, channel):
        self._client = purerpc.Client(
            "nsp.v1.ConfigurationManager",
            channel
        )
        self.WatchTrench = self._client.get_method_stub(
            "WatchTrench",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_STREAM,
                proxy_dot_api_dot_nsp_dot_v1_dot_model__pb2.Trench,
                proxy_dot_api_dot_nsp_dot_v1_dot_configurationmanager__pb2.TrenchResponse,
            )
        )
        self.WatchConduit = self._client.get_method_stub(
            "WatchConduit",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_STREAM,
                proxy_dot_api_dot_nsp_dot_v1_dot_model__pb2.Conduit,
                proxy_dot_api_dot_nsp_dot_v1_dot_configurationmanager__pb2.ConduitResponse,
            )
        )
        self.WatchStream = self._client.get_method_stub(
            "WatchStream",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_STREAM,
                proxy_dot_api_dot_nsp_dot_v1_dot_model__pb2.Stream,
                proxy_dot_api_dot_nsp_dot_v1_dot_configurationmanager__pb2.StreamResponse,
            )
        )
        self.WatchFlow = self._client.get_method_stub(
            "WatchFlow",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_STREAM,
                proxy_dot_api_dot_nsp_dot_v1_dot_model__pb2.Flow,
                proxy_dot_api_dot_nsp_dot_v1_dot_configurationmanager__pb2.FlowResponse,
            )
        )
        self.WatchVip = self._client.get_method_stub(
            "WatchVip",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_STREAM,
                proxy_dot_api_dot_nsp_dot_v1_dot_model__pb2.Vip,
                proxy_dot_api_dot_nsp_dot_v1_dot_configurationmanager__pb2.VipResponse,
            )
        )
        self.WatchAttractor = self._client.get_method_stub(
            "WatchAttractor",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_STREAM,
                proxy_dot_api_dot_nsp_dot_v1_dot_model__pb2.Attractor,
                proxy_dot_api_dot_nsp_dot_v1_dot_configurationmanager__pb2.AttractorResponse,
            )
        )
        self.WatchGateway = self._client.get_method_stub(
            "WatchGateway",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_STREAM,
                proxy_dot_api_dot_nsp_dot_v1_dot_model__pb2.Gateway,
                proxy_dot_api_dot_nsp_dot_v1_dot_configurationmanager__pb2.GatewayResponse,
            )
        )