"""quant/linear.py scratch_buffer: one growing buffer per role, whatever the shapes asked for."""

from __future__ import annotations

import torch

from qlorakit.quant.linear import scratch_buffer


def test_shapes_of_one_role_share_one_buffer_grown_to_the_largest():
    cpu = torch.device("cpu")
    role = "test-role"
    long = scratch_buffer(role, (4, 256, 64), torch.float32, cpu)
    short = scratch_buffer(role, (4, 100, 64), torch.float32, cpu)  # a batch of shorter rows
    assert short.shape == (4, 100, 64) and short.is_contiguous()
    assert short.untyped_storage().data_ptr() == long.untyped_storage().data_ptr()  # no new buffer per length
    longer = scratch_buffer(role, (4, 512, 64), torch.float32, cpu)
    assert longer.untyped_storage().nbytes() == 4 * 512 * 64 * 4  # grown once to the largest request
    assert scratch_buffer(role, (8, 64), torch.float32, cpu).untyped_storage().data_ptr() == longer.untyped_storage().data_ptr()


def test_roles_and_dtypes_get_separate_buffers():
    cpu = torch.device("cpu")
    a = scratch_buffer("test-a", (16, 16), torch.float32, cpu)
    b = scratch_buffer("test-b", (16, 16), torch.float32, cpu)
    c = scratch_buffer("test-a", (16, 16), torch.bfloat16, cpu)
    pointers = {t.untyped_storage().data_ptr() for t in (a, b, c)}
    assert len(pointers) == 3


def test_no_buffer_off_the_cpu():
    assert scratch_buffer("test-a", (2, 2), torch.float32, torch.device("meta")) is None
