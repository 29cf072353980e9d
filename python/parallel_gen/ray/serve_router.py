"""AffinityRouter: Ray Serve's request-router interface around :class:`.routing.AffinityPolicy`.

Serve runs a router in every process that holds a handle to the model deployment (here:
each ingress replica); it hands ``choose_replicas`` the handle call's arguments, the
first of which is a :class:`ForwardedRequest` carrying its :class:`.routing.RouteKey`.
"""

from __future__ import annotations

from typing import Dict, List, Optional

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from .routing import AffinityPolicy, RouteKey
from .serve_types import ForwardedRequest, saw_replicas

# Serve pickles this module by value (RequestRouterConfig): module state (the registry of
# replicas, locks) lives in serve_types, which is imported by reference.


class AffinityRouter(RequestRouter):
    """Session -> consistent hashing; else longest recent prefix unless imbalanced; else
    shortest queue. ``request_router_kwargs`` are :class:`AffinityPolicy`'s fields. A
    request naming a replica (``ForwardedRequest.replica``) goes to it."""

    def initialize_state(self, **kwargs) -> None:
        self.policy = AffinityPolicy(**kwargs)

    def update_replicas(self, replicas: List[RunningReplica]) -> None:
        super().update_replicas(replicas)
        ids = [r.replica_id.unique_id for r in replicas]
        self.policy.update(ids)
        saw_replicas(self._deployment_id.name, ids)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.policy.update(r.unique_id for r in self.curr_replicas)

    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> List[List[RunningReplica]]:
        request = _forwarded(pending_request)
        if request is None:
            return [candidate_replicas]
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        if request.replica is not None:
            return [[by_id[request.replica]]] if request.replica in by_id else [candidate_replicas]
        queue_lens: Dict[str, int] = {}
        cache = self.replica_queue_len_cache
        for rid, replica in by_id.items():
            n = cache.get(replica.replica_id)
            if n is not None:
                queue_lens[rid] = n
        ranks = self.policy.choose(request.key, list(by_id), queue_lens)
        return [[by_id[r] for r in rank] for rank in ranks]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        request = _forwarded(pending_request)
        if request is not None and request.replica is None:
            self.policy.routed(request.key, replica_id.unique_id)


def _forwarded(pending: Optional[PendingRequest]) -> Optional[ForwardedRequest]:
    if pending is None or not pending.args or not isinstance(pending.args[0], ForwardedRequest):
        return None
    return pending.args[0]


__all__ = ["AffinityRouter", "RouteKey"]
