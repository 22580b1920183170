"""Babel itself, without I/O: the codec, neighbors, route table, speaker."""
