"""The router's services: one folder each, all built on services.common."""
