"""verify's projection and its one decision: penalize a neighbor whose
over-claims fill the sliding evaluation window.

Pure functions of (state, event): expiry times come from the event's own
time, so a replay decides the same penalties.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from google.protobuf.message import Message
from mesh.meter.v1 import meter_pb2
from mesh.route.v1 import route_pb2
from mesh.verify.v1 import verify_pb2

from services.common.envelope import Event, MalformedEvent
from services.common.runtime import Handler, Outgoing

from .judge import PenaltyPolicy


def on_route_changed(
    state: verify_pb2.VerifyState, event: Event[route_pb2.RouteChanged]
) -> list[Outgoing]:
    route = event.payload
    if route.change == route_pb2.ROUTE_CHANGE_RETRACTED:
        state.targets.pop(route.prefix, None)
        state.in_use.pop(route.prefix, None)
        return []
    state.targets[route.prefix].CopyFrom(verify_pb2.VerifyState.Target(
        next_hop_id=route.next_hop_id, advertised_metric=route.advertised_metric,
        metric=route.metric, tunnel_interface=route.tunnel_interface,
        next_hop_address=route.next_hop_address, changed_at=event.occurred_at,
        alternatives=route.alternatives))
    return []


def on_usage(state: verify_pb2.VerifyState, event: Event[meter_pb2.UsageMetered]) -> list[Outgoing]:
    for destination in event.payload.destinations:
        if destination.tx_bytes and destination.prefix in state.targets:
            state.in_use[destination.prefix].CopyFrom(event.payload.period_end)
    return []


def make_handlers(policy: PenaltyPolicy) -> Mapping[type[Message], Handler[Any]]:
    def on_verified(
        state: verify_pb2.VerifyState, event: Event[verify_pb2.RouteVerified]
    ) -> list[Outgoing]:
        verified = event.payload
        if not verified.neighbor_id:
            raise MalformedEvent("RouteVerified without a neighbor")
        record = state.neighbors[verified.neighbor_id]
        name = verify_pb2.Verdict.Name(verified.verdict)
        record.verdicts[name] += 1
        record.last.CopyFrom(verified)
        over = verified.verdict == verify_pb2.VERDICT_OVERCLAIMED
        # One over-claim per probing round: a round that went badly for us
        # (the machine or our own link stalled) shows on every prefix at
        # once; a liar's show round after round.
        if not (over and record.HasField("last_overclaim")
                and record.last_overclaim.window_start == verified.window_start):
            record.recent.append(verified.verdict)
            del record.recent[:-policy.windows]
        if verified.verdict == verify_pb2.VERDICT_HONEST:
            record.honest_streak += 1
            if record.offenses and record.honest_streak >= policy.forgive_after:
                record.offenses -= 1
                record.honest_streak = 0
        else:
            record.honest_streak = 0
        if over:
            record.last_overclaim.CopyFrom(verified)
        if record.HasField("penalty"):
            return []
        # Excluding our last unpenalized neighbor would cut us off; a router
        # that finds every neighbor lying is likelier measuring its own trouble.
        if not any(not other.HasField("penalty") for neighbor_id, other
                   in state.neighbors.items() if neighbor_id != verified.neighbor_id):
            return []
        overclaims = [v for v in record.recent if v == verify_pb2.VERDICT_OVERCLAIMED]
        if len(overclaims) < policy.overclaimed:
            return []
        expires = event.occurred_at.seconds + policy.duration(record.offenses)
        penalty = verify_pb2.NeighborPenalized(
            neighbor_id=verified.neighbor_id, mode=verify_pb2.PENALTY_MODE_EXCLUDE,
            windows=len(record.recent), overclaimed_windows=len(overclaims),
            prefixes=[verified.prefix])
        penalty.expires_at.seconds = expires
        return [Outgoing("penalized", verified.neighbor_id, penalty)]

    def on_penalized(
        state: verify_pb2.VerifyState, event: Event[verify_pb2.NeighborPenalized]
    ) -> list[Outgoing]:
        record = state.neighbors[event.payload.neighbor_id]
        record.penalty.CopyFrom(event.payload)
        record.offenses += 1
        del record.recent[:]
        return []

    def on_pardoned(
        state: verify_pb2.VerifyState, event: Event[verify_pb2.NeighborPardoned]
    ) -> list[Outgoing]:
        record = state.neighbors.get(event.payload.neighbor_id)
        if record is not None:
            record.ClearField("penalty")
        return []

    return {
        route_pb2.RouteChanged: on_route_changed,
        meter_pb2.UsageMetered: on_usage,
        verify_pb2.RouteVerified: on_verified,
        verify_pb2.NeighborPenalized: on_penalized,
        verify_pb2.NeighborPardoned: on_pardoned,
    }


def summarize(state: verify_pb2.VerifyState) -> Mapping[str, Any]:
    penalized = sorted(n for n, r in state.neighbors.items() if r.HasField("penalty"))
    return {
        "targets": len(state.targets),
        "in_use": len(state.in_use),
        "penalized": ",".join(penalized) or "-",
        "windows": sum(sum(r.verdicts.values()) for r in state.neighbors.values()),
    }
