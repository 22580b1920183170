"""meshctl: talk to the services of a node (and run the emulated mesh)."""
