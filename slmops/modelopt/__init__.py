"""Model optimisation for operators: the server's quantizers (control_plane.modelopt, re-exported
here for the CLI), plus measuring and comparing variants (evaluate, measure, compare, sample)."""

from __future__ import annotations

from control_plane.modelopt import *  # noqa: F403
from control_plane.modelopt import __all__ as __all__
