"""The operator dashboard served at `/`: server-rendered Jinja2 pages, one CSS and one JS file.

Everything ships in this package (no CDN, no build step). Pages authenticate with an API token
kept in the HttpOnly cookie `slmops_token`; the JSON API under `/v1` still needs the header.
"""

from control_plane.dashboard.routes import router

__all__ = ["router"]
