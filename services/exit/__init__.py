"""exit: registration, tunnels and NAT between clients, exits and gateways."""
