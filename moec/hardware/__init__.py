"""Target presets, latency/energy models, RPC farm client, power meters and the measurement store."""
