"""
a3s-gateway: an API gateway for AI-era traffic on Twisted.

It reads A3S Gateway's ``gateway.hcl``, routes requests by Traefik-style rules, balances them over
healthy backends and streams every response without buffering.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
