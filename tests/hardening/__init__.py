"""Receiver hardening tests: TLS, limits and timeouts, hostile input, fuzz."""
