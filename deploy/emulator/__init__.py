"""Emulated mesh: routers as network namespaces joined by veth links."""
