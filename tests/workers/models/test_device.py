"""pin_device: one device per worker process, threads set on purpose, clear errors."""

from __future__ import annotations

import os

import pytest
import torch

from workers.models.device import pin_device


@pytest.fixture(autouse=True)
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_cpu_uses_the_cores_it_may_run_on():
    assert pin_device("cpu") == torch.device("cpu")
    assert torch.get_num_threads() == len(os.sched_getaffinity(0))


def test_cpu_threads_as_given():
    pin_device("cpu", threads=1)
    assert torch.get_num_threads() == 1


@pytest.mark.parametrize("device", ["gpu", "CUDA:0", "cuda:", "cuda:-1", "cuda:x", "mps", ""])
def test_unknown_device_strings_are_refused(device):
    with pytest.raises(ValueError, match="'cpu' or 'cuda:N'"):
        pin_device(device)


def test_threads_must_be_positive():
    with pytest.raises(ValueError, match="threads must be at least 1, got 0"):
        pin_device("cpu", threads=0)


def test_a_cuda_device_that_does_not_exist_is_a_clear_error():
    with pytest.raises(ValueError, match=r"device 'cuda:99' does not exist"):
        pin_device("cuda:99")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_on_a_machine_without_gpus():
    with pytest.raises(ValueError, match="no CUDA device is visible"):
        pin_device("cuda:0")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_becomes_the_current_device():
    index = torch.cuda.device_count() - 1
    assert pin_device(f"cuda:{index}") == torch.device("cuda", index)
    assert torch.cuda.current_device() == index
    assert pin_device("cuda") == torch.device("cuda", 0)
