"""verify: probes the destinations we route through each neighbor, compares
what it measures with the metric the neighbor advertised, and penalizes a
neighbor that over-claims, until it behaves."""
