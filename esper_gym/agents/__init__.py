"""Policies for esper-gym: they see only observations and action masks."""
