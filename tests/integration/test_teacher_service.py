"""``distill`` with ``teacher: service`` on real Ray Train + DeepSpeed (CPU), against the online
and offline teachers, shared by two concurrent stages, and through a killed teacher replica."""

from __future__ import annotations

import time

import pytest
import torch

from mmkd_test_plugins.gates import DEADLINE_S, Gate, GatedStageContext, wait_until
from stage_helpers import stage_ctx
from workloads.distill import DistillConfig, distill, service_spec, validate_distill
from workloads.teacher_logits import TeacherLogitsConfig, teacher_logits
from workloads.teacher.service import ServiceUse, ServiceSpec, find_service

TERMS = ("loss", "ce", "l_res", "l_vis", "l_rel")
# 3 steps over the same seeded batches in every run (1 worker, preserved row order)
RUN = dict(max_steps=3, batch_size=8, lr=1e-3, checkpoint_every=0, warmup_ratio=0,
           train=["projector"])
SMALL_K = 8


def _one(root, stage, inputs):
    return stage_ctx(root, stage, inputs, workers=1)


def _steps(ctx):
    return [e["metrics"] for e in ctx.local_metrics]


def _assert_same_losses(a, b, what):
    assert len(a) == len(b) == RUN["max_steps"], what
    for step, (ma, mb) in enumerate(zip(a, b)):
        for k in TERMS:
            assert mb[k] == pytest.approx(ma[k], rel=1e-4, abs=1e-6), (what, step, k, ma, mb)


def _run_as_task(config, ctx):
    """Run a stage as the runner does: in a Ray task of its own (num_cpus=0)."""
    import ray

    def stage(config, ctx):
        final = distill(config, ctx)
        return final, ctx.local_metrics

    return ray.remote(num_cpus=0, max_retries=0)(stage).remote(config, ctx)


def _wait_gone(name, timeout=DEADLINE_S):
    """Wait until the service ``name`` has ended (its name is free); AssertionError after
    ``timeout`` s naming it."""
    wait_until(f"teacher service {name} to end", lambda: find_service(name) is None,
               timeout=timeout)
    return True


@pytest.fixture(scope="module")
def setup(ray_session, tmp_path_factory):
    from mmkd_test_plugins.data_tiny import build_tiny_data
    from workloads.models import build_model, save_model

    root = tmp_path_factory.mktemp("teacher_service")
    data = build_tiny_data(root / "data", num_samples=32, vocab_size=320)
    torch.manual_seed(0)
    teacher_dir = save_model(*build_model({"preset": "tiny-teacher"}, data["tokenizer"]),
                             str(root / "teacher" / "model"))
    torch.manual_seed(1)
    student_dir = save_model(*build_model({"preset": "tiny-student"}, data["tokenizer"]),
                             str(root / "student" / "model"))
    inputs = {"init": student_dir, "teacher": teacher_dir, "data": data["instruct"]}
    return {"root": root, "data": data, "teacher": teacher_dir, "inputs": inputs}


@pytest.fixture(scope="module")
def online(setup):
    ctx = _one(setup["root"], "online", setup["inputs"])
    distill(DistillConfig(teacher="online", **RUN), ctx)
    return _steps(ctx)


@pytest.fixture(scope="module")
def shared(setup):
    """Two service stages at k = V running at once (each a Ray task, as the runner runs them)."""
    import ray

    config = DistillConfig(teacher="service", **RUN)
    ctxs = [_one(setup["root"], f"shared_{i}", setup["inputs"]) for i in range(2)]
    name = service_spec(config, ctxs[0]).name
    results = ray.get([_run_as_task(config, c) for c in ctxs])
    try:
        gone = _wait_gone(name)
    except AssertionError:
        gone = False
    return {"name": name, "finals": [r[0] for r in results],
            "steps": [[e["metrics"] for e in r[1]] for r in results], "gone": gone}


def test_service_at_full_k_equals_online(online, shared):
    for steps in shared["steps"]:
        _assert_same_losses(online, steps, "service (k = V) vs online")


def test_two_concurrent_stages_share_one_service(shared):
    finals = shared["finals"]
    # the stage that left last saw the service's totals: both stages were its users
    last = min(finals, key=lambda f: (f["teacher_service/users"], -f["teacher_service/requests"]))
    assert last["teacher_service/users"] == 0, finals  # its unregister ended the service
    assert last["teacher_service/users_seen"] == 2, finals
    assert last["teacher_service/loads"] == 1, finals  # one teacher load served both
    assert last["teacher_service/replicas"] == 1
    # both stages ask for the same 32 rows (3 batches of 8 + one sent ahead): each row is
    # forwarded once; the other stage's ask is a cache or in-flight hit
    stats = {k: last[f"teacher_service/{k}"] for k in
             ("requests", "rows_requested", "rows_forwarded", "dedup_hits")}
    assert stats["requests"] >= 6, stats
    assert stats["rows_forwarded"] + stats["dedup_hits"] == stats["rows_requested"], stats
    assert stats["rows_forwarded"] <= 32 and stats["dedup_hits"] >= stats["rows_requested"] / 2
    assert shared["gone"], f"service {shared['name']} still running after both stages ended"


@pytest.fixture(scope="module")
def offline_small_k(setup):
    s = setup
    tl = _one(s["root"], "tlogits", {"teacher": s["teacher"], "data": s["data"]["instruct"]})
    teacher_logits(TeacherLogitsConfig(top_k=SMALL_K, batch_size=16, max_length=256), tl)
    ctx = _one(s["root"], "offline", {"init": s["inputs"]["init"],
                                      "teacher_logits": tl.output_dir,
                                      "data": s["data"]["instruct"]})
    distill(DistillConfig(teacher="offline", **RUN), ctx)
    return _steps(ctx)


@pytest.mark.parametrize("victim", ["replica", "coordinator"])
def test_a_killed_service_process_restarts_and_the_stage_completes(setup, offline_small_k,
                                                                    victim, tmp_path):
    """A teacher replica killed once the first request was answered is restarted and the later
    requests wait for it; a killed coordinator is restarted by Ray (with new replicas) and the
    later calls go to it. Either way the stage completes with the losses of the same student
    distilled from the teacher's stored top-k logits at the same k (the service's answers are
    the stored ones, before and after a restart)."""
    import ray

    config = DistillConfig(teacher="service", top_k=SMALL_K, **RUN)
    # the stage holds after step 1 (batch 0 answered, batch 1 asked ahead) until the kill is
    # done: batches 2 and 3 are asked after it, so they need the restart whatever the timing
    gate = Gate(tmp_path / "gate")
    ctx = GatedStageContext(**vars(_one(setup["root"], f"killed_{victim}", setup["inputs"])),
                            gate_dir=gate.folder, hold_after_step=1)
    name = service_spec(config, ctx).name
    assert _wait_gone(name)  # the previous test's service (same name) has ended
    task = _run_as_task(config, ctx)

    def held():
        if ray.wait([task], timeout=0)[0]:
            ray.get(task)  # the stage's own error, if it failed
            raise AssertionError("the stage ended without holding after step 1")
        return gate.held()

    try:
        wait_until("the stage to hold after its first step", held, timeout=300)
        service = find_service(name)
        assert service is not None, f"teacher service {name} is not running"
        assert ray.get(service.metrics.remote())["requests"] >= 1
        target = ray.get(service.replicas.remote())[0] if victim == "replica" else service
        ray.kill(target, no_restart=False)
    finally:
        gate.release()  # on a failure too: the stage ends instead of holding
    final, events = ray.get(task)
    assert final["steps"] == RUN["max_steps"]
    if victim == "replica":
        assert final["teacher_service/loads"] == 2, final  # the first load and the restart
    else:  # the restarted coordinator's counters start again, with its new replica's load
        assert final["teacher_service/restarted"] == 1 and \
            final["teacher_service/loads"] == 1, final
    # the restarted teacher is the same frozen model: the losses are the offline ones
    _assert_same_losses(offline_small_k, [e["metrics"] for e in events], f"after a {victim} kill")
    assert _wait_gone(name)


def test_a_user_that_stops_heartbeating_is_dropped_and_the_service_ends(setup):
    """A stage whose driver died (registered, then silent): its lease expires, and the
    service, left without users, kills its replica and itself."""
    spec = ServiceSpec(teacher_dir=setup["teacher"], top_k=3, lease_s=2.0)
    lease = ServiceUse(spec, stage="dies").__enter__()
    # its replicas, asked while the lease still beats (the service cannot end meanwhile)
    replicas = __import__("ray").get(lease.handle.replicas.remote())
    lease._stop.set()  # the driver "dies": no more heartbeats, no unregister
    lease._beat.join()
    assert _wait_gone(spec.name)
    for r in replicas:
        _wait_dead(r)


def test_consecutive_stages_of_a_run_share_one_load(setup):
    """A stage told that later stages of its run use the service (``side_later``) leaves the
    run holding it: the next stage finds the teacher loaded (one load for both), and the last
    stage drops the hold, so the service ends with it."""
    config = DistillConfig(teacher="service", top_k=5, **RUN)
    ctxs = [_one(setup["root"], f"seq_{i}", setup["inputs"]) for i in range(2)]
    for i, c in enumerate(ctxs):
        c.run_id, c.side_later = "run-seq", 1 - i
    name = service_spec(config, ctxs[0]).name
    distill(config, ctxs[0])
    assert find_service(name) is not None, "the run's hold kept no service for the next stage"
    final = distill(config, ctxs[1])
    assert final["teacher_service/loads"] == 1, final
    assert final["teacher_service/users_seen"] == 3, final  # stage, the run's hold, stage
    assert _wait_gone(name)


def test_a_runs_hold_ends_with_the_run_or_after_hold_s(setup):
    """The runner's ``release_run`` at the end of a run drops the hold at once; a hold nobody
    releases (its driver died) ends after ``hold_s``."""
    from workloads.teacher.service import release_run

    spec = ServiceSpec(teacher_dir=setup["teacher"], top_k=4)
    with ServiceUse(spec, stage="a", run_id="run-held", hold_s=600):
        pass
    service = find_service(spec.name)
    assert service is not None and __import__("ray").get(service.metrics.remote())["users"] == 1
    release_run("run-held")
    assert _wait_gone(spec.name)
    hold_s = 8.0
    with ServiceUse(spec, stage="b", run_id="run-dead-driver", hold_s=hold_s):
        # the hold is registered as the block exits, after this instant: it cannot expire
        # before `since + hold_s`, and without it the service would end as the stage leaves
        since = time.monotonic()
    _wait_gone(spec.name)
    lived = time.monotonic() - since
    assert lived >= hold_s, f"the service ended {lived:.1f} s after its stage left: not held"


def _wait_dead(handle, timeout=DEADLINE_S):
    """Wait until the actor ``handle`` is dead (a call fails with RayActorError); a call that
    does not answer in time (the actor busy, still loading) is asked again."""
    import ray

    def dead() -> bool:
        try:
            ray.get(handle.info.remote(), timeout=5)
        except ray.exceptions.RayActorError:
            return True
        except ray.exceptions.GetTimeoutError:
            pass
        return False

    wait_until(f"teacher replica {handle} to be dead", dead, timeout=timeout)


def test_validate_the_service_wiring():
    cfg = DistillConfig(teacher="service", top_k=16, max_steps=2)
    assert validate_distill(cfg, {"init": "s.model", "teacher": "t.model"}) == []
    probs = validate_distill(cfg, {"init": "s.model", "teacher_logits": "tl.logits"})
    assert any("needs input `teacher" in p for p in probs), probs
    assert any("top_k` applies to `teacher: service` only" in p
               for p in validate_distill(DistillConfig(top_k=16, max_steps=2),
                                         {"init": "s.model", "teacher": "t.model"}))
    with pytest.raises(ValueError, match="replicas"):
        DistillConfig(teacher="service", teacher_resources={"replicas": 0}, max_steps=2)
