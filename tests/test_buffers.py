"""The export's big CPU buffers: reused inside ``reusing()`` only once nothing can see them, never more mapped
than was live at once, all unmapped when the block ends."""

from __future__ import annotations

import gc
import threading

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from offload_export._buffers import _POOL, anon_empty, cast, reusing

MiB = 1 << 20


def test_a_dead_buffer_is_reused_for_the_next_one_of_its_size():
    with reusing():
        a = anon_empty((2 * MiB,), torch.uint8)
        at = a.data_ptr()
        del a
        b = anon_empty((MiB,), torch.int16)  # the same bytes, another dtype
        assert b.data_ptr() == at
        assert _POOL.mapped == 2 * MiB
    del b
    assert (_POOL.mapped, _POOL.idle) == (0, [])


def test_a_buffer_is_not_reused_while_a_view_of_it_lives():
    with reusing():
        a = anon_empty((4, MiB), torch.uint8)
        view = a[1:2]
        at = a.data_ptr()
        del a
        b = anon_empty((4, MiB), torch.uint8)
        assert b.data_ptr() != at
        view.fill_(7)
        b.fill_(1)
        assert bool((view == 7).all())
        del view
        c = anon_empty((4, MiB), torch.uint8)
        assert c.data_ptr() == at
    del b, c
    assert _POOL.mapped == 0


def test_a_larger_idle_buffer_serves_up_to_twice_its_request_and_no_more():
    with reusing():
        a = anon_empty((3 * MiB,), torch.uint8)
        at = a.data_ptr()
        del a
        fits = anon_empty((2 * MiB,), torch.uint8)
        assert fits.data_ptr() == at and fits.numel() == 2 * MiB
        del fits
        assert [size for size, _ in _POOL.idle] == [3 * MiB]
        small = anon_empty((MiB,), torch.uint8)  # 3 x the request: a new mapping (the idle one unmapped)
        assert small.data_ptr() != at or _POOL.idle == []
        assert _POOL.mapped == MiB
    del small
    assert _POOL.mapped == 0


def test_the_pool_maps_no_more_than_was_live_at_once():
    with reusing():
        a = anon_empty((8 * MiB,), torch.uint8)
        del a
        b = anon_empty((5 * MiB,), torch.uint8)  # takes the idle 8 MiB (at most twice the request)
        assert _POOL.mapped == 8 * MiB
        c = anon_empty((3 * MiB,), torch.uint8)  # nothing idle: mapped, 11 MiB live
        del b, c
        d = anon_empty((20 * MiB,), torch.uint8)  # fits neither: both unmapped, 20 MiB is the new peak
        assert _POOL.mapped == 20 * MiB and not _POOL.idle
    del d
    assert _POOL.mapped == 0


def test_buffers_die_in_other_threads_and_after_the_block():
    with reusing():
        kept = [anon_empty((MiB,), torch.uint8) for _ in range(4)]
        t = threading.Thread(target=kept.clear)
        t.start()
        t.join()
        assert len(_POOL.idle) == 4
        late = anon_empty((MiB,), torch.uint8)
    assert _POOL.idle == [] and _POOL.mapped == MiB
    del late
    assert _POOL.mapped == 0


def test_outside_the_block_nothing_is_counted_or_kept():
    a = anon_empty((2 * MiB,), torch.uint8)
    del a
    gc.collect()
    assert (_POOL.mapped, _POOL.idle) == (0, [])


def test_cast_goes_into_a_buffer_and_leaves_other_tensors_alone():
    w = torch.randn(1024, 512, dtype=torch.float32)
    with reusing():
        out = cast(w, torch.bfloat16)
        assert out.dtype == torch.bfloat16 and torch.equal(out, w.to(torch.bfloat16))
        assert _POOL.mapped == out.numel() * 2
    ints = torch.arange(10)
    assert cast(ints, torch.float16) is ints and cast(w, None) is w and cast(w, torch.float32) is w
    del out


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 6), st.integers(0, 7)), min_size=1, max_size=40))
def test_live_buffers_never_share_memory_and_keep_their_bytes(steps):
    """Any sequence of allocations (1-6 MiB) and frees: live buffers are disjoint and keep what was written
    into them, and the pool never maps more than the most that was live at once."""
    live: list[tuple[torch.Tensor, int]] = []
    most = 0
    with reusing():
        for i, (alloc, mib, pick) in enumerate(steps):
            if alloc or not live:
                live.append((anon_empty((mib * MiB,), torch.uint8).fill_(i % 251), i % 251))
            else:
                gone, mark = live.pop(pick % len(live))
                assert bool((gone == mark).all())
                del gone
            spans = sorted((t.data_ptr(), t.data_ptr() + t.numel()) for t, _ in live)
            assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
            most = max(most, sum(t.numel() for t, _ in live))
            assert _POOL.mapped <= 2 * most  # a reused buffer is at most twice its request
        assert all(bool((t == mark).all()) for t, mark in live)
        live.clear()
    assert _POOL.mapped == 0
