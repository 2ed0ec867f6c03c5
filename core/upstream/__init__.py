"""Upstream clusters, endpoints and the Balancer interface."""
