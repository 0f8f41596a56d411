"""A big submit pauses the cyclic garbage collector and always starts it again."""

from __future__ import annotations

import gc

import pytest

from farm import Farm, InvalidJob, Txt2Img
from farm.submit import gc_paused


def test_the_collector_runs_again_after_a_submit_and_after_a_refused_one(settings):
    with Farm(settings) as farm:
        assert gc.isenabled()
        farm.submit_many(Txt2Img(model="tiny", prompt="a fox", seed=i) for i in range(3))
        assert gc.isenabled()
        with pytest.raises(InvalidJob):
            farm.submit_many([{"kind": "txt2img", "model": "tiny", "prompt": "x", "width": 100}])
        assert gc.isenabled()


def test_a_collector_someone_paused_stays_paused():
    gc.disable()
    try:
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()
    with gc_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
