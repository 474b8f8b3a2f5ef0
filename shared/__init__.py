"""Wire schemas and topic names shared by the control plane and the edge agent.

This package imports neither `control_plane` nor `edge_agent`; both import it. Every message
carries `schema_version` so either side can refuse what it does not understand.
"""

SCHEMA_VERSION = 1
