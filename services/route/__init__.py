"""route: Babel (RFC 8966) on each link's tunnel with a price per route,
selection by metric and price with the operator's knob, verify's penalties
applied, the selected routes installed in the kernel."""
