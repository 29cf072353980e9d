"""What the ingress and the model replicas of :func:`parallel_gen.ray.serve` pass each
other: an HTTP request, forwarded whole, and its response's parts, streamed back."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple

from .routing import RouteKey

REPLICA_HEADER = "x-replica-id"
"""The response header naming the model replica that answered."""


@dataclass(frozen=True)
class ForwardedRequest:
    """An HTTP request as the ingress received it, with its routing key (what the router
    reads). ``replica``: send it to this replica id (``/metrics`` asks each in turn)."""

    method: str
    path: str
    query: bytes
    headers: List[Tuple[bytes, bytes]]
    body: bytes
    key: RouteKey = field(default_factory=RouteKey)
    replica: Optional[str] = None


@dataclass(frozen=True)
class ResponseStart:
    """The first part of a forwarded response; the parts after it are body bytes."""

    status: int
    headers: List[Tuple[bytes, bytes]]


_replicas_lock = threading.Lock()
_replicas: Dict[str, List[str]] = {}


def saw_replicas(deployment: str, replica_ids: Iterable[str]) -> None:
    """Records the replicas a router of this process was given for ``deployment``."""
    with _replicas_lock:
        _replicas[deployment] = list(replica_ids)


def known_replicas(deployment: str) -> List[str]:
    """The replica ids the routers of this process last saw for ``deployment`` (what the
    ingress's ``/metrics`` asks one by one)."""
    with _replicas_lock:
        return list(_replicas.get(deployment, []))
