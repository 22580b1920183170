"""discovery: signed hellos on every physical link, turned into NeighborSeen /
NeighborLost events for link. See hello.py for the wire format."""
