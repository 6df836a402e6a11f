"""Freeing the placement groups of Ray Train runs whose controller died.

A Ray Train run reserves its workers' CPUs/GPUs in a placement group created by its controller
actor. The controller is owned by the stage task that called ``fit()``; when that task dies (Tune
stopped the trial that owns it, a worker ran out of memory, the stage was cancelled) the
controller dies with it — but Ray keeps a group alive until its creating actor *and* its job are
gone, and the job is the mmkd driver, which lives on. Ray Train's own safety net (a detached
``PlacementGroupCleaner``) only knows a group after the worker group has fully started, asks the
dashboard whether the controller lives and stops after one cleanup, so a run killed while
starting its workers, or restarting them, left its group behind: the next trial or stage waited
for those CPUs forever (seen in the tune benchmark and in CI).

A controller killed while it is creating a group can even register one *after* GCS declared it
dead, and GCS never flags that group as orphaned (the tune benchmark's next trial hung on one).

mmkd itself therefore removes its job's groups whose creating actor is dead, by the group's
flag or by the actor table. Nothing can use such a group any more: only the dead actor knew its handle, and the tasks it placed there were
owned by that actor and die with it. Groups created by the driver (Tune's trial groups) have no
creating actor and are never touched; neither are detached groups or other jobs' groups.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Iterator

logger = logging.getLogger("mmkd")


def live_placement_groups() -> Iterator[Any]:
    """GCS's records (``PlacementGroupTableData``) of the cluster's groups not yet removed; unlike
    the public ``placement_group_table`` they carry the creator fields."""
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    for raw in state._connect_and_get_accessor().get_placement_group_table():
        pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
        if pg.state != gcs_pb2.PlacementGroupTableData.REMOVED:
            yield pg


def orphaned_placement_groups() -> list[str]:
    """Ids (hex) of this job's live, non-detached groups whose creating actor has died."""
    import ray
    from ray._private.state import state

    accessor = state._connect_and_get_accessor()
    job = ray.get_runtime_context().get_job_id()
    out = []
    for pg in live_placement_groups():
        creator = ray.ActorID(pg.creator_actor_id)
        if pg.is_detached or creator.is_nil() or pg.creator_job_id.hex() != job:
            continue
        # GCS flags a group when its creator dies, but a dying controller can still create one
        # after that (seen: an ASHA-stopped trial's controller, already DEAD with "owner died",
        # left a new group flagged alive): ask the actor table as well.
        if pg.creator_actor_dead or _actor_dead(accessor, creator):
            out.append(pg.placement_group_id.hex())
    return out


def _actor_dead(accessor, actor_id) -> bool:
    from ray.core.generated import gcs_pb2

    info = accessor.get_actor_info(actor_id)
    if info is None:
        return False  # not registered yet: a group is created only by a running actor
    return gcs_pb2.ActorTableData.FromString(info).state == gcs_pb2.ActorTableData.DEAD


def reap_orphaned_placement_groups() -> list[str]:
    """Remove the groups `orphaned_placement_groups` finds; returns their ids."""
    from ray.util.placement_group import PlacementGroup, remove_placement_group
    import ray

    removed = []
    for pg_id in orphaned_placement_groups():
        try:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))
        except Exception as e:  # already removed by Ray Train's cleaner meanwhile
            logger.debug("placement group %s: %s", pg_id, e)
            continue
        removed.append(pg_id)
    if removed:
        logger.info("freed %d placement group(s) left by Ray Train runs whose stage died: %s",
                    len(removed), ", ".join(removed))
    return removed


class Reaper:
    """Calls `reap_orphaned_placement_groups` at most every ``every_s`` seconds (driver loops)."""

    def __init__(self, every_s: float = 2.0):
        self.every_s = every_s
        self._last = 0.0
        self.removed: list[str] = []

    def maybe_reap(self) -> None:
        now = time.monotonic()
        if now - self._last < self.every_s:
            return
        self._last = now
        try:
            self.removed += reap_orphaned_placement_groups()
        except Exception as e:  # a GCS hiccup must never take the driver down
            logger.warning("could not check for leaked placement groups: %s", e)
