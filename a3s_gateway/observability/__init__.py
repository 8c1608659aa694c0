"""
What an operator sees of a running gateway without reading its code, for the gateway that wires
it in: the Prometheus metrics (L{a3s_gateway.observability.metrics}), the JSON access log
(L{a3s_gateway.observability.access_log}), trace propagation and span export
(L{a3s_gateway.observability.tracing}) and the admin API and dashboard
(L{a3s_gateway.observability.admin}). The per-request parts are observers of every
L{a3s_gateway.proxy.site.GatewaySite}, called once per finished (or aborted) request.
"""
