"""link: a mutual signed handshake with each neighbor discovery hears, then one
WireGuard tunnel per neighbor; only packets from those tunnels are forwarded."""
