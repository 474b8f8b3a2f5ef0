"""The operator dashboard served at `/`: server-rendered Jinja2 pages, one CSS and one JS file.

Everything ships in this package (no CDN, no build step). Signing in with an API token starts a
server-side session (HttpOnly cookie `slmops_session`); the JSON API under `/v1` still needs the header.
"""

from control_plane.dashboard.routes import router

__all__ = ["router"]
