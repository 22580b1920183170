"""Running a node: its configuration files, meshctl, and the emulated mesh."""
