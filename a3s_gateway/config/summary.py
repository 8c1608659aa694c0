# -*- test-case-name: tests.test_config_summary -*-
"""
The success text of ``a3s-gateway validate``, for the CLI: the reference's summary lines, in
configuration-file order (the reference prints hash-map order). No trailing newline.
"""

from __future__ import annotations

from typing import List

from a3s_gateway.config.schema import GatewayConfig

_PROTOCOLS = {"http": "Http", "tcp": "Tcp", "udp": "Udp"}
_STRATEGIES = {
    "round-robin": "RoundRobin",
    "weighted": "Weighted",
    "least-connections": "LeastConnections",
    "random": "Random",
}


def validation_summary(config: GatewayConfig, path: str) -> str:
    """The lines printed on stdout when ``config``, read from ``path``, is valid."""
    lines: List[str] = [
        f"✓ Config parsed successfully ({path})",
        "✓ Configuration is valid",
        "",
        f"  Entrypoints: {len(config.entrypoints)}",
    ]
    for name, entrypoint in config.entrypoints.items():
        protocol = _PROTOCOLS[entrypoint.protocol]
        lines.append(f"    - {name} → {entrypoint.address} ({protocol})")
    lines.append(f"  Routers:     {len(config.routers)}")
    for name, router in config.routers.items():
        lines.append(f"    - {name} → service:{router.service} rule:{router.rule}")
    lines.append(f"  Services:    {len(config.services)}")
    for name, service in config.services.items():
        balancer = service.load_balancer
        strategy = _STRATEGIES[balancer.strategy]
        lines.append(f"    - {name} ({len(balancer.servers)} backends, strategy: {strategy})")
    # Two spaces after the colon: the reference's alignment, kept byte for byte.
    lines.append(f"  Middlewares:  {len(config.middlewares)}")
    lines.extend(f"    - {name}" for name in config.middlewares)
    providers = config.providers
    if providers.file is not None:
        lines.append("  Provider:    file (hot reload)")
    if providers.discovery is not None:
        lines.append("  Provider:    discovery (health-based)")
    if providers.kubernetes is not None:
        lines.append("  Provider:    kubernetes")
    return "\n".join(lines)
