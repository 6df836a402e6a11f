"""mmkd frees the placement groups that Ray Train runs leave when their stage dies, and only those."""

import time

import pytest


@pytest.mark.timeout(120)
def test_reaper_frees_groups_of_dead_actors_only(ray_session):
    import ray
    from ray.util import placement_group, placement_group_table, remove_placement_group

    from orchestrator.placement import orphaned_placement_groups, reap_orphaned_placement_groups

    @ray.remote(num_cpus=0)
    class Controller:  # like Ray Train's controller: it creates its workers' group
        def reserve(self):
            self.pg = placement_group([{"CPU": 0.25}])
            ray.get(self.pg.ready())
            return self.pg.id.hex()

    driver_pg = placement_group([{"CPU": 0.25}])  # like Tune's trial groups: no creating actor
    ray.get(driver_pg.ready())
    alive, dying = Controller.remote(), Controller.remote()
    alive_pg, dying_pg = ray.get(alive.reserve.remote()), ray.get(dying.reserve.remote())
    try:
        assert dying_pg not in orphaned_placement_groups()
        ray.kill(dying)
        deadline = time.monotonic() + 30
        while dying_pg not in orphaned_placement_groups():
            assert time.monotonic() < deadline, "GCS never marked the killed actor's group"
            time.sleep(0.2)
        assert reap_orphaned_placement_groups() == [dying_pg]
        table = placement_group_table()
        assert table[dying_pg]["state"] == "REMOVED"
        assert table[alive_pg]["state"] == "CREATED"
        assert table[driver_pg.id.hex()]["state"] == "CREATED"
        assert reap_orphaned_placement_groups() == []
    finally:
        ray.kill(alive)
        remove_placement_group(driver_pg)
