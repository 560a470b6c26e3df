"""`python -m mle_agent` runs `mle-agentd`."""

from __future__ import annotations

import sys

from mle_agent.daemon import main

if __name__ == "__main__":
    sys.exit(main())
