"""Replay benchmark: trace workloads through policies on virtual time, scored one way for all."""
