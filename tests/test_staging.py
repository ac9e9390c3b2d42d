"""Staged iterations: chunks of draws on the device equal the released one-at-a-time draws, and the
stream's recorded state continues exactly where training stopped."""
import numpy as np
import pytest
import torch

from src.method.staging import StepInputs
from src.method.unmix import BOXES, GLOBAL, LAM, LR, SLOT, draw_unmix, host_row

SIZES = [(32, 32)]


def released_rows(seed, n, lrs, iters_per_epoch):
    """One iteration at a time, as the released loop draws."""
    rng = np.random.RandomState(seed)
    return [host_row(draw_unmix(rng, 1.0, 0.5, SIZES), lrs[it], it % iters_per_epoch, 0.5, SIZES) for it in range(n)]


def staged(seed, lrs, chunk, iters_per_epoch=5):
    inputs = StepInputs("cpu", 0.5, 1.0, SIZES, np.random.RandomState(seed), lrs, chunk=chunk)
    inputs.iters_per_epoch = iters_per_epoch
    return inputs


def consume(inputs, it):
    """What an iteration does with its row: stage if needed, read on the device, count on the host."""
    inputs.ensure(it)
    row = inputs.next_row()
    inputs.consumed()
    return row


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_chunks_give_the_released_draws_in_order(chunk):
    lrs = np.linspace(0.5, 0.01, 13)
    expected = torch.tensor(released_rows(7, 13, lrs, 5), dtype=torch.float32)
    inputs = staged(7, lrs, chunk)
    rows = torch.stack([consume(inputs, it) for it in range(13)])
    assert torch.equal(rows, expected)
    assert set(rows[:, GLOBAL].tolist()) == {0.0, 1.0}  # both kinds of mixing were drawn
    assert rows[:, SLOT].tolist() == [it % 5 for it in range(13)]
    assert inputs.host_lrs[inputs.used - 1] == lrs[12]


def test_the_recorded_state_is_that_of_the_first_iteration_not_trained():
    """A checkpoint after iteration 4 of a chunk of 8 records the stream as the one-at-a-time loop would
    have it; a run restarted from that state continues with the same draws."""
    lrs = np.linspace(0.5, 0.01, 20)
    inputs = staged(11, lrs, 8)
    for it in range(5):
        consume(inputs, it)
    ref = np.random.RandomState(11)
    for _ in range(5):
        draw_unmix(ref, 1.0, 0.5, SIZES)
    state = inputs.rng_state()
    assert all(np.array_equal(a, b) for a, b in zip(state, ref.get_state()))
    assert inputs.rng.get_state()[2] != ref.get_state()[2]  # the stream itself is ahead (drawn in a chunk)
    inputs.rewind()  # what saving does
    assert all(np.array_equal(a, b) for a, b in zip(inputs.rng.get_state(), ref.get_state()))
    continued = torch.stack([consume(inputs, it) for it in range(5, 12)])
    restarted = staged(0, lrs, 8)
    restarted.rng.set_state(state)
    again = torch.stack([consume(restarted, it) for it in range(5, 12)])
    assert torch.equal(continued, again)
    assert torch.equal(continued, torch.tensor(released_rows(11, 12, lrs, 5)[5:], dtype=torch.float32))


def test_given_draws_are_staged_one_at_a_time():
    inputs = staged(0, None, 4)
    rng = np.random.RandomState(2)
    draws = draw_unmix(rng, 1.0, 0.5, SIZES)
    inputs.stage_one(6, draws, 0.125)
    row = inputs.next_row()
    assert row[LR].item() == 0.125 and row[SLOT].item() == 1.0
    assert row[LAM].item() == pytest.approx(host_row(draws, 0.125, 1, 0.5, SIZES)[LAM])
    assert len(row) == BOXES + 4


def test_without_a_stream_an_iteration_needs_its_draws():
    with pytest.raises(ValueError, match="draws"):
        staged(0, None, 4).ensure(0)
    inputs = StepInputs("cpu", 0.5, 1.0, SIZES, rng=None, lr_schedule=[0.1])
    with pytest.raises(ValueError, match="draws"):
        inputs.ensure(0)
