"""Resilience: circuit breaking and load shedding, so one sick dependency cannot sink the gateway."""
