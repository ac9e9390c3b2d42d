"""Staged iterations: chunks of draws on the device equal the released one-at-a-time draws, and the
stream's recorded state continues exactly where training stopped."""
import numpy as np
import pytest
import torch

from src.method.staging import StepInputs, StepNumbers, host_numbers, pack, unpack
from src.method.unmix import UnmixDraws, draw_unmix

SIZES = [(32, 32)]


def released_rows(seed, n, lrs, iters_per_epoch):
    """One iteration at a time, as the released loop draws, each iteration's numbers as one vector."""
    rng = np.random.RandomState(seed)
    rows = []
    for it in range(n):
        values = host_numbers(draw_unmix(rng, 1.0, 0.5, SIZES), it % iters_per_epoch, 0.5, SIZES, {"lr": lrs[it]})
        rows.append(as_vector(unpack(torch.tensor(pack(values, 1)), 1)))
    return torch.stack(rows)


def as_vector(numbers):
    return torch.cat([t.reshape(-1) for t in numbers])


def staged(seed, lrs, chunk, iters_per_epoch=5):
    inputs = StepInputs("cpu", 0.5, 1.0, SIZES, np.random.RandomState(seed),
                        None if lrs is None else {"lr": lrs}, chunk=chunk)
    inputs.iters_per_epoch = iters_per_epoch
    return inputs


def consume(inputs, it):
    """What an iteration does with its numbers: stage if needed, read on the device, count on the host."""
    inputs.ensure(it)
    numbers = inputs.next_numbers()
    inputs.consumed()
    return numbers


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_chunks_give_the_released_draws_in_order(chunk):
    lrs = np.linspace(0.5, 0.01, 13)
    expected = released_rows(7, 13, lrs, 5)
    inputs = staged(7, lrs, chunk)
    numbers = [consume(inputs, it) for it in range(13)]
    assert torch.equal(torch.stack([as_vector(n) for n in numbers]), expected)
    assert {n.mode.item() for n in numbers} == {0.0, 1.0}  # both kinds of mixing were drawn
    assert [n.slot.item() for n in numbers] == [it % 5 for it in range(13)]
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
    continued = torch.stack([as_vector(consume(inputs, it)) for it in range(5, 12)])
    restarted = staged(0, lrs, 8)
    restarted.rng.set_state(state)
    again = torch.stack([as_vector(consume(restarted, it)) for it in range(5, 12)])
    assert torch.equal(continued, again)
    assert torch.equal(continued, released_rows(11, 12, lrs, 5)[5:])


def test_given_draws_are_staged_one_at_a_time():
    inputs = staged(0, None, 4)
    draws = UnmixDraws(r=0.9, lam=0.75, centers=[(16, 16)])
    inputs.give(6, draws, 0.125)
    numbers = inputs.next_numbers()
    assert numbers.lr.item() == 0.125 and numbers.slot.item() == 1.0 and numbers.mode.item() == 1.0
    assert numbers.boxes.tolist() == [[8, 8, 24, 24]]
    assert numbers.lam.item() == 0.75 and numbers.one_minus_lam.item() == 0.25  # 1 - 256 / 1024


def test_the_numbers_are_named_views_of_one_row():
    """Every field of StepNumbers is staged and read back by name, per-pair fields one row per pair."""
    values = {"lr": 0.5, "mode": 1, "mix_a": 0.25, "mix_b": 0.75, "lam": 0.125, "one_minus_lam": 0.875, "slot": 3,
              "boxes": [(1, 2, 3, 4), (5, 6, 7, 8)]}
    assert set(values) == set(StepNumbers._fields)
    row = torch.tensor(pack(values, 2))
    numbers = unpack(row, 2)
    assert numbers.boxes.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert {k: v.item() for k, v in numbers._asdict().items() if k != "boxes"} == \
        {k: float(v) for k, v in values.items() if k != "boxes"}
    assert all(t.untyped_storage().data_ptr() == row.untyped_storage().data_ptr() for t in numbers)


def test_reading_the_state_for_a_checkpoint_changes_nothing():
    lrs = np.linspace(0.5, 0.01, 20)
    a, b = staged(3, lrs, 8), staged(3, lrs, 8)
    first = [as_vector(consume(a, it)) for it in range(3)] + [as_vector(consume(b, it)) for it in range(3)]
    a.rng_state()
    assert torch.equal(torch.stack([as_vector(consume(a, it)) for it in range(3, 12)]),
                       torch.stack([as_vector(consume(b, it)) for it in range(3, 12)]))
    assert all(torch.equal(x, y) for x, y in zip(first[:3], first[3:]))


def test_without_a_stream_an_iteration_needs_its_draws():
    with pytest.raises(ValueError, match="draws"):
        staged(0, None, 4).ensure(0)
    inputs = StepInputs("cpu", 0.5, 1.0, SIZES, rng=None, schedules={"lr": [0.1]})
    with pytest.raises(ValueError, match="draws"):
        inputs.ensure(0)
