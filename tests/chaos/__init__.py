"""Chaos tests (``make chaos``): real servers killed and paused, real worker, API and subscriber
processes, and the guarantees of DESIGN §7 checked against what Redis holds afterwards."""
