"""sharp: the node's test-traffic daemon (after FRR's sharpd).

It answers every PingSent on evt.sharp.ping.<origin> with a PongSent on
evt.sharp.pong.<origin> and keeps a projection of the pings it has seen, so
the chassis (bus, log, projection, inspection, supervision) can be exercised
end to end on a live node. Not enabled on a production router by default.
"""
