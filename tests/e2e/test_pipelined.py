"""The pipelined worker (`workers.pipeline`) with real worker processes: a batch claimed
ahead while one renders, and one behind on the writer's thread, each job still ending once.

One worker, `FARM_MAX_BATCH=2`, slow steps (fault injection) so the moments between the
claim ahead and its turn, or the writer holding a batch, last long enough to act in; every
test ends with the checker on a versioned bucket (no job lost, no key written twice).
"""

from __future__ import annotations

import time

import pytest

from farm import Farm, JobState, Txt2Img
from farm.local.up import LocalFarm
from farm.state.tracker import Tracker
from tests.e2e.test_faults import make_settings, redis_aof  # noqa: F401  (a fixture)
from tests.support.checker import check

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def line(tmp_path_factory, s3_server, redis_aof):  # noqa: F811
    settings, store = make_settings(
        tmp_path_factory.mktemp("pipelined"), s3_server, redis_aof.url, max_batch=2
    )
    with (
        LocalFarm(settings, workers=1, threads=1, preload=["tiny"]) as lf,
        Farm(lf.settings) as farm,
    ):
        farm.local, farm.store_s3, farm.submitted = lf, store, {}
        farm.tracker = Tracker.from_settings(lf.settings)
        yield farm


def submit(farm, n, seed, prompt="[fault:slow-steps=1.0] a fox", **kw):
    """`n` jobs of one batch signature (2 steps), in the order given, most urgent first."""
    specs = [
        Txt2Img(
            model="tiny",
            prompt=prompt if isinstance(prompt, str) else prompt[i],
            seed=seed + i,
            num_inference_steps=2,
            priority=9 - i,
            **kw,
        )
        for i in range(n)
    ]
    ids = [j.id for j in farm.submit_many(specs)]
    farm.submitted.update(dict.fromkeys(ids, 1))  # what the checker expects outputs of
    return ids


def wait_for(farm, ids, wanted, timeout=60):
    """Poll the jobs' (state, step) until `wanted(states)` holds; the states."""
    deadline = time.monotonic() + timeout
    while True:
        states = farm.tracker.states(ids)
        if wanted(states):
            return states
        assert time.monotonic() < deadline, states
        time.sleep(0.02)


def ahead(states, first, then):
    """Jobs `first` rendering (a step done) and jobs `then` claimed, not started: ahead."""
    return all(s == "running" and step >= 1 for s, step, _ in (states[i] for i in first)) and all(
        s == "running" and step == 0 for s, step, _ in (states[i] for i in then)
    )


def test_a_batch_claimed_ahead_of_a_killed_worker_is_handed_back_and_done_once(line):
    ids = submit(line, 4, seed=100)
    wait_for(line, ids, lambda st: ahead(st, [0, 1], [2, 3]))
    line.local.procs[0].kill()  # SIGKILL: the leases run out, the reconciler hands them back
    records = line.wait(ids, timeout=180)
    assert [r.state for r in records] == [JobState.SUCCEEDED] * 4, [r.error for r in records]
    assert [r.attempt for r in records] == [2, 2, 2, 2]
    verdict = check(line.store_s3, line.submitted)
    assert verdict.clean, verdict
    assert all(verdict.writes[f"jobs/{i}/out/0.png"] == 1 for i in ids)


def test_sigterm_with_a_batch_ahead_and_one_behind_ends_every_job_once(line):
    # Jobs 0-1 render first, then wait 4 s on the writer's thread before storing; 2-3 render
    # meanwhile, and 4-5 are claimed ahead as 2-3 enter their last step: SIGTERM then.
    slow_store = "[fault:slow-steps=0.5] [fault:slow-store=4] a fox"
    prompts = [slow_store] * 2 + ["[fault:slow-steps=0.5] a fox"] * 4
    ids = submit(line, 6, seed=200, prompt=prompts)

    def three_deep(st):
        behind = all(s == "running" and step == 2 for s, step, _ in st[:2])
        return behind and ahead(st, [2, 3], [4, 5])

    wait_for(line, ids, three_deep)
    proc = line.local.procs[0]
    proc.terminate()
    proc.wait(60)  # it exits only once the writer has stored what it held
    after = line.tracker.states(ids)
    assert [s for s, _, _ in after[:2]] == ["succeeded"] * 2, after
    assert [s for s, _, _ in after[2:]] == ["queued"] * 4, after  # handed back, or rerun
    records = line.wait(ids, timeout=180)
    assert [r.state for r in records] == [JobState.SUCCEEDED] * 6, [r.error for r in records]
    assert [r.attempt for r in records] == [1, 1, 2, 2, 2, 2]
    verdict = check(line.store_s3, line.submitted)
    assert verdict.clean, verdict
    assert all(verdict.writes[f"jobs/{i}/out/0.png"] == 1 for i in ids)
    assert all(verdict.writes[f"jobs/{i}/meta.json"] == 1 for i in ids)


def test_a_job_cancelled_while_claimed_ahead_ends_cancelled_and_is_never_rendered(line):
    ids = submit(line, 4, seed=300)
    wait_for(line, ids, lambda st: ahead(st, [0, 1], [2, 3]))
    assert line.cancel(ids[2]) == JobState.RUNNING
    records = line.wait(ids, timeout=120, raise_on_failure=False)
    states = [r.state for r in records]
    assert states == [JobState.SUCCEEDED] * 2 + [JobState.CANCELLED, JobState.SUCCEEDED], [
        r.error for r in records
    ]
    assert records[2].error == "cancelled while waiting its turn"
    assert records[2].progress.step == 0
    assert line.store_s3.list(f"jobs/{ids[2]}/") == []
    line.submitted.pop(ids[2])
    verdict = check(line.store_s3, line.submitted)
    assert verdict.clean, verdict
