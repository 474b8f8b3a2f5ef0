"""Telemetry storage and queries: rollups of raw windows, retention, fleet summary and series.

Kept import-light: `control_plane.models` imports `control_plane.telemetry.tables` for the metadata.
"""
