"""uvicorn's Server, told about the app's lifecycle (imported only by ``serve``)."""

from __future__ import annotations

import signal
import sys
from typing import Any, List, Optional

import uvicorn


class LifecycleServer(uvicorn.Server):
    """Marks the app as shutting down as soon as SIGTERM or SIGINT comes, so /health
    answers 503 while running requests finish (streams included) within the graceful
    shutdown timeout; exits 0 after; prints the address it listens on (port 0 included)."""

    def __init__(self, config: uvicorn.Config, life: Any) -> None:
        super().__init__(config)
        self._life = life

    def handle_exit(self, sig: int, frame: Any) -> None:
        # Not uvicorn's own: it re-raises the signal after a graceful shutdown, so the
        # process would die of SIGTERM instead of exiting 0. A second Ctrl-C still forces.
        self._life.shutting_down()
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True

    async def startup(self, sockets: Optional[List[Any]] = None) -> None:
        await super().startup(sockets)
        for server in self.servers:
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                host = f"[{host}]" if ":" in host else host  # an IPv6 address, as a URL writes it
                print(f"parallel-gen serve: listening on http://{host}:{port}", file=sys.stderr, flush=True)
