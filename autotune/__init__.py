"""Autotuner: config spaces, timers, cache backends (local dir, Redis)."""
