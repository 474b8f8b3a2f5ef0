"""`slmops-agent --config FILE` or `python -m edge_agent --config FILE`: the same daemon as
`slmops agent --config FILE`, without the CLI's or the server's imports: it runs in an agent-only
install (`pip install 'slmops[agent]'`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edge_agent.errors import AgentError


def main() -> int:
    parser = argparse.ArgumentParser(prog="slmops-agent", description="slmops edge agent daemon")
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--log-json", action="store_true")
    args = parser.parse_args()
    from edge_agent.daemon import run
    from edge_agent.settings import load_settings

    try:
        overrides = {"log_json": True} if args.log_json else {}
        return run(load_settings(args.config, **overrides))
    except AgentError as exc:
        sys.stderr.write(f"slmops-agent: error ({exc.code}): {exc}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
