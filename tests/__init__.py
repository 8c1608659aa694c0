"""Tests for a3s_gateway."""
