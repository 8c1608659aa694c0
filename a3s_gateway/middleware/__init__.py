"""Middlewares: the request and response phases a router runs around its service."""
