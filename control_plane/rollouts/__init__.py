"""Staged rollouts: plans, variant selection, gates, the controller, and desired-state publishing."""
