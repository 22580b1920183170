"""sharp's definition: what it consumes and how it folds it."""

from __future__ import annotations

from mesh.sharp.v1 import sharp_pb2

from services.common.runtime import ServiceDefinition

from .handlers import HANDLERS, summarize

DEFINITION = ServiceDefinition(
    name="sharp",
    state_type=sharp_pb2.SharpState,
    subjects=("evt.sharp.ping.>",),
    handlers=HANDLERS,
    summarize=summarize,
)
