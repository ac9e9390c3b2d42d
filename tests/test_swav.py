"""The SwAV loss with its queue, the Un-Mix SwAV loss, and the method's hyper-parameters."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from src.method.swav import EmbeddingQueue, SwavConfig, Term, swapped_losses, unmix_terms

EPS, T, ITERS = 0.05, 0.1, 3


def swav_loss(embedding, output, bs, cfg, queue=None, prototypes=None, queue_in_use=False, reverse=False,
              reverse_predictions=False):
    """One released `swav_loss` call (optionally with the mixture's codes reversed) through
    `swapped_losses`, the queue's host count advanced after it; returns (loss, queue in use)."""
    if queue is not None and not isinstance(queue, EmbeddingQueue):
        queue = EmbeddingQueue(queue, queue_in_use)
    term = Term(tuple(range(int(sum(cfg.nmb_crops)))), reverse, reverse_predictions)
    return _run([term], embedding, output, bs, cfg, queue, prototypes, queue_in_use)


def unmix_swav_loss(embedding, output, bs, n_pairs, lam, cfg, queue=None, prototypes=None, loss_form="released"):
    """The Un-Mix loss as the iteration computes it; returns (loss, queue in use)."""
    from src.method.swav import unmix_swav_loss as loss_fn
    if queue is not None and not isinstance(queue, EmbeddingQueue):
        queue = EmbeddingQueue(queue)
    plan = None if queue is None else queue.plan(3, bs)
    loss = loss_fn(embedding, output, bs, n_pairs, lam, cfg, queue, prototypes, loss_form, plan=plan)
    if queue is not None:
        queue.advance(plan, bs)
    return loss, False if queue is None else queue.in_use


def _run(terms, embedding, output, bs, cfg, queue, prototypes, in_use=False):
    plan = None if queue is None else queue.plan(len(terms), bs)
    [loss] = swapped_losses(embedding, output, bs, terms, cfg, queue, prototypes, plan)
    if queue is not None:
        queue.advance(plan, bs)
    return loss, in_use if queue is None else queue.in_use


# ---------------------------------------------------------------- explicit reference formulas

def ref_sinkhorn(s, epsilon=EPS, iterations=ITERS):
    s = np.asarray(s, dtype=np.float64)
    b, k = s.shape
    q = np.exp(s / epsilon).T
    q = q / q.sum()
    for _ in range(iterations):
        q = q * ((1.0 / k) / q.sum(axis=1))[:, None]
        q = q * ((1.0 / b) / q.sum(axis=0))[None, :]
    return (q / q.sum(axis=0, keepdims=True)).T


def ref_log_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def ref_ce(q, pred):
    """-mean_i sum_k q[i, k] log softmax(pred[i] / T)_k"""
    return -np.mean(np.sum(q * ref_log_softmax(np.asarray(pred) / T), axis=1))


def fake_outputs(n_chunks, bs=4, d=5, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    emb = F.normalize(torch.randn(n_chunks * bs, d, generator=g), dim=1)
    protos = F.normalize(torch.randn(k, d, generator=g), dim=1)
    return emb, emb @ protos.t(), protos


def chunk(t, i, bs=4):
    return t[i * bs:(i + 1) * bs].detach().double().numpy()


def split_triples(t, bs, n_pairs):
    """Reference: rows [x0, x1, m0, x2, x3, m1, ...] -> plain [x0, x1, x2, x3, ...], mixed [m0, x1, m1, x3, ...]."""
    plain, mixed = [], []
    for p in range(n_pairs):
        o = 3 * p * bs
        plain += [t[o:o + bs], t[o + bs:o + 2 * bs]]
        mixed += [t[o + 2 * bs:o + 3 * bs], t[o + bs:o + 2 * bs]]
    return torch.cat(plain), torch.cat(mixed)


# ---------------------------------------------------------------- SwAV loss

def test_swav_loss_by_hand_two_crops():
    bs = 4
    emb, out, _ = fake_outputs(2, bs)
    cfg = SwavConfig(crops_for_assign=(0, 1), nmb_crops=(2,), temperature=T, epsilon=EPS, sinkhorn_iterations=ITERS)
    loss, in_use = swav_loss(emb, out, bs, cfg)
    o0, o1 = chunk(out, 0), chunk(out, 1)
    expected = 0.5 * (ref_ce(ref_sinkhorn(o0), o1) + ref_ce(ref_sinkhorn(o1), o0))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert in_use is False


def test_swav_loss_three_crops_divides_by_crops_minus_one():
    bs = 4
    emb, out, _ = fake_outputs(3, bs, seed=1)
    cfg = SwavConfig(crops_for_assign=(0, 1), nmb_crops=(3,), temperature=T, epsilon=EPS, sinkhorn_iterations=ITERS)
    loss, _ = swav_loss(emb, out, bs, cfg)
    o = [chunk(out, i) for i in range(3)]
    q0, q1 = ref_sinkhorn(o[0]), ref_sinkhorn(o[1])
    expected = 0.5 * ((ref_ce(q0, o[1]) + ref_ce(q0, o[2])) / 2 + (ref_ce(q1, o[0]) + ref_ce(q1, o[2])) / 2)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_swav_loss_gradient_flows_through_predictions_only():
    bs = 4
    emb, out, _ = fake_outputs(2, bs, seed=2)
    out = out.clone().requires_grad_(True)
    cfg = SwavConfig(temperature=T, epsilon=EPS, sinkhorn_iterations=ITERS)
    loss, _ = swav_loss(emb, out, bs, cfg)
    loss.backward()
    q = [torch.from_numpy(ref_sinkhorn(chunk(out, i))).float() for i in range(2)]
    # d/dx of -mean sum q log softmax(x / T), halved by len(crops_for_assign): (softmax - q) / (T bs 2)
    g1 = (F.softmax(out[bs:].detach() / T, dim=1) - q[0]) / (T * bs * 2)
    g0 = (F.softmax(out[:bs].detach() / T, dim=1) - q[1]) / (T * bs * 2)
    assert torch.allclose(out.grad, torch.cat([g0, g1]), atol=1e-5)


def test_queue_is_filled_then_used():
    bs, L, d = 4, 8, 5
    cfg = SwavConfig(temperature=T, epsilon=EPS, sinkhorn_iterations=ITERS)
    queue = torch.zeros(2, L, d)
    batches = [fake_outputs(2, bs, d, seed=s) for s in (10, 11, 12)]
    protos = batches[0][2]
    batches = [(e, e @ protos.t()) for e, _, _ in batches]

    # call 1: last row zero -> queue unused; rows shift down by bs and this batch is written on top
    e, o = batches[0]
    loss, in_use = swav_loss(e, o, bs, cfg, queue=queue, prototypes=protos)
    assert in_use is False
    assert loss.item() == pytest.approx(swav_loss(e, o, bs, cfg)[0].item(), rel=1e-6)
    for i in range(2):
        assert torch.equal(queue[i, :bs], e[i * bs:(i + 1) * bs])
        assert torch.all(queue[i, bs:] == 0)

    # call 2: the last row is still zero -> unused; call 1's rows move down
    e2, o2 = batches[1]
    _, in_use = swav_loss(e2, o2, bs, cfg, queue=queue, prototypes=protos)
    assert in_use is False
    for i in range(2):
        assert torch.equal(queue[i, :bs], e2[i * bs:(i + 1) * bs])
        assert torch.equal(queue[i, bs:], e[i * bs:(i + 1) * bs])

    # call 3: the last row is non-zero -> queue scores prepended before Sinkhorn, last bs codes kept
    before = queue.clone()
    e3, o3 = batches[2]
    loss3, in_use = swav_loss(e3, o3, bs, cfg, queue=queue, prototypes=protos)
    assert in_use is True
    qs = [ref_sinkhorn(np.concatenate([(before[i] @ protos.t()).double().numpy(), chunk(o3, i)]))[-bs:]
          for i in range(2)]
    expected = 0.5 * (ref_ce(qs[0], chunk(o3, 1)) + ref_ce(qs[1], chunk(o3, 0)))
    assert loss3.item() == pytest.approx(expected, rel=1e-5)
    assert loss3.item() != pytest.approx(swav_loss(e3, o3, bs, cfg)[0].item(), rel=1e-4)
    for i in range(2):
        assert torch.equal(queue[i, :bs], e3[i * bs:(i + 1) * bs])
        assert torch.equal(queue[i, bs:], before[i, :-bs])


def test_queue_in_use_flag_forces_use_of_a_zero_queue():
    bs = 4
    e, o, protos = fake_outputs(2, bs, seed=4)
    cfg = SwavConfig(temperature=T, epsilon=EPS, sinkhorn_iterations=ITERS)
    plain = swav_loss(e, o, bs, cfg)[0].item()
    loss, in_use = swav_loss(e, o, bs, cfg, queue=torch.zeros(2, 8, 5), prototypes=protos, queue_in_use=True)
    assert in_use is True
    qs = [ref_sinkhorn(np.concatenate([np.zeros((8, 3)), chunk(o, i)]))[-bs:] for i in range(2)]
    assert loss.item() == pytest.approx(0.5 * (ref_ce(qs[0], chunk(o, 1)) + ref_ce(qs[1], chunk(o, 0))), rel=1e-5)
    assert loss.item() != pytest.approx(plain, rel=1e-4)


def test_reverse_reverses_codes_and_queued_embedding_of_crop0_only():
    bs = 4
    e, o, protos = fake_outputs(2, bs, seed=5)
    cfg = SwavConfig(temperature=T, epsilon=EPS, sinkhorn_iterations=ITERS)
    queue = torch.zeros(2, 4, 5)
    loss, _ = swav_loss(e, o, bs, cfg, queue=queue, prototypes=protos, reverse=True)
    o0, o1 = chunk(o, 0), chunk(o, 1)
    q0 = ref_sinkhorn(o0[::-1])  # codes of the reversed crop 0
    q1 = ref_sinkhorn(o1)
    expected = 0.5 * (ref_ce(q0, o1) + ref_ce(q1, o0))  # predictions never reversed
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert torch.equal(queue[0], torch.flip(e[:bs], dims=[0]))
    assert torch.equal(queue[1], e[bs:])

    # the authors' later form also reverses crop 0's predictions
    loss_p, _ = swav_loss(e, o, bs, cfg, reverse=True, reverse_predictions=True)
    expected_p = 0.5 * (ref_ce(q0, o1) + ref_ce(q1, o0[::-1]))
    assert loss_p.item() == pytest.approx(expected_p, rel=1e-5)


def test_unmix_swav_loss_decomposition():
    bs = 4
    emb, out, _ = fake_outputs(3, bs, seed=6)  # [x0, x1, m0]
    cfg = SwavConfig(temperature=T, epsilon=EPS, sinkhorn_iterations=ITERS)
    ep, em = split_triples(emb, bs, 1)
    op, om = split_triples(out, bs, 1)
    l_plain = swav_loss(ep, op, bs, cfg)[0]
    l_mixed = swav_loss(em, om, bs, cfg)[0]
    l_rev = swav_loss(em, om, bs, cfg, reverse=True)[0]
    assert l_mixed.item() != pytest.approx(l_rev.item(), rel=1e-4)
    loss1, _ = unmix_swav_loss(emb, out, bs, 1, 1.0, cfg)
    assert loss1.item() == pytest.approx((l_plain + l_mixed).item(), rel=1e-6)
    loss3, _ = unmix_swav_loss(emb, out, bs, 1, 0.3, cfg)
    assert loss3.item() == pytest.approx((l_plain + 0.3 * l_mixed + 0.7 * l_rev).item(), rel=1e-6)


def symmetric(t, bs):
    """Each bs-chunk made symmetric under reversal: rows [a, b, b, a]."""
    chunks = []
    for c in t.split(bs):
        half = c[:bs // 2]
        chunks.append(torch.cat([half, torch.flip(half, dims=[0])]))
    return torch.cat(chunks)


def test_paper_form_differs_in_general_but_not_on_reversal_symmetric_batches():
    bs = 4
    cfg = SwavConfig(temperature=T, epsilon=EPS, sinkhorn_iterations=ITERS)
    emb, out, _ = fake_outputs(3, bs, seed=7)
    released, _ = unmix_swav_loss(emb, out, bs, 1, 0.4, cfg, loss_form="released")
    paper, _ = unmix_swav_loss(emb, out, bs, 1, 0.4, cfg, loss_form="paper")
    assert abs(released.item() - paper.item()) > 1e-4
    se, so = symmetric(emb, bs), symmetric(out, bs)
    released, _ = unmix_swav_loss(se, so, bs, 1, 0.4, cfg, loss_form="released")
    paper, _ = unmix_swav_loss(se, so, bs, 1, 0.4, cfg, loss_form="paper")
    assert released.item() == pytest.approx(paper.item(), rel=1e-6)


def test_unknown_loss_form():
    emb, out, _ = fake_outputs(3)
    with pytest.raises(ValueError, match="loss form"):
        unmix_swav_loss(emb, out, 4, 1, 0.5, SwavConfig(), loss_form="mine")


def test_unmix_loss_writes_all_three_calls_into_the_queue():
    bs = 4
    emb, out, protos = fake_outputs(3, bs, seed=8)
    x0, x1, m0 = emb[:bs], emb[bs:2 * bs], emb[2 * bs:]
    queue = torch.zeros(2, 3 * bs, 5)
    cfg = SwavConfig(temperature=T, epsilon=EPS, sinkhorn_iterations=ITERS)
    _, in_use = unmix_swav_loss(emb, out, bs, 1, 0.5, cfg, queue=queue, prototypes=protos)
    assert in_use is False  # filled only by the third call, after its check
    assert torch.equal(queue[0], torch.cat([torch.flip(m0, dims=[0]), m0, x0]))
    assert torch.equal(queue[1], torch.cat([x1, x1, x1]))
    _, in_use = unmix_swav_loss(emb, out, bs, 1, 0.5, cfg, queue=queue, prototypes=protos)
    assert in_use is True


def test_swav_config_from_dict_ignores_other_keys():
    cfg = SwavConfig.from_dict({"epsilon": 0.03, "nmb_crops": [2, 4], "arch": "resnet18", "world_size": 2})
    assert cfg.epsilon == 0.03 and list(cfg.nmb_crops) == [2, 4] and cfg.world_size == 2
    assert cfg.temperature == 0.1 and tuple(cfg.crops_for_assign) == (0, 1)
    assert math.isclose(SwavConfig().epsilon, 0.05)


# ---------------------------------------------------------------- the queue's host-side count

def released_check(queue, i):
    """The released test, read from the tensor: the queue is in use once its last row is non-zero."""
    return not torch.all(queue[i, -1, :] == 0).item()


def test_queue_count_agrees_with_the_released_tensor_check():
    bs, L = 4, 12
    emb, out, protos = fake_outputs(3, bs, seed=9)
    cfg = SwavConfig(temperature=T, epsilon=EPS, sinkhorn_iterations=ITERS)
    tensor = torch.zeros(2, L, 5)
    queue = EmbeddingQueue(tensor)
    assert queue.filled == [0, 0]
    reference = tensor.clone()
    for call in range(5):
        in_use_before = queue.in_use or released_check(reference, 0)
        swav_loss(emb[:2 * bs], out[:2 * bs], bs, cfg, queue=queue, prototypes=protos)
        assert queue.in_use == in_use_before, call
        reference = tensor.clone()
        assert queue.filled == [min(L, (call + 1) * bs)] * 2
        assert EmbeddingQueue(tensor.clone()).filled == queue.filled  # recount from the tensor agrees


def test_unmix_loss_with_a_queue_in_use_equals_three_released_calls_in_turn():
    """The terms' codes are computed together (one batched Sinkhorn, the queue written once); the result
    equals the released order: plain, mixed, reversed, each checking, using and then pushing the queue."""
    bs = 4
    emb, out, protos = fake_outputs(3, bs, seed=10)
    cfg = SwavConfig(temperature=T, epsilon=EPS, sinkhorn_iterations=ITERS)
    full = F.normalize(torch.randn(2, 8, 5, generator=torch.Generator().manual_seed(11)), dim=2)
    for start in (full, torch.cat([torch.zeros(2, 4, 5), full[:, :4]], 1)):  # full; filled by the 2nd call
        q_batched, q_seq = start.clone(), start.clone()
        loss, in_use = unmix_swav_loss(emb, out, bs, 1, 0.3, cfg, queue=q_batched, prototypes=protos)
        ep, em = split_triples(emb, bs, 1)
        op, om = split_triples(out, bs, 1)
        seq_queue = EmbeddingQueue(q_seq)
        l_plain, _ = swav_loss(ep, op, bs, cfg, queue=seq_queue, prototypes=protos)
        l_mixed, _ = swav_loss(em, om, bs, cfg, queue=seq_queue, prototypes=protos)
        l_rev, seq_in_use = swav_loss(em, om, bs, cfg, queue=seq_queue, prototypes=protos, reverse=True)
        assert in_use == seq_in_use
        assert loss.item() == pytest.approx((l_plain + 0.3 * l_mixed + 0.7 * l_rev).item(), rel=1e-6)
        assert torch.equal(q_batched, q_seq)


def test_unmix_terms():
    plain, mixed, rev = unmix_terms(1)
    assert plain == Term((0, 1)) and mixed == Term((2, 1)) and rev == Term((2, 1), reverse=True)
    assert unmix_terms(1, "paper")[2].reverse_predictions


def test_queue_plan_changes_nothing_and_advance_counts():
    queue = EmbeddingQueue(torch.zeros(2, 12, 5))
    plan = queue.plan(3, 4)  # checks before the 1st, 2nd and 3rd term: 0, 4 and 8 rows written of 12
    assert plan == ((False, False), (False, False), (False, False))
    assert queue.filled == [0, 0] and not queue.in_use
    queue.advance(plan, 4)
    assert queue.filled == [12, 12] and not queue.in_use  # full only after the third term's check
    assert queue.plan(3, 4) == ((True, True),) * 3
    queue.in_use = False
    half = EmbeddingQueue(torch.zeros(2, 12, 5), filled=[4, 4])
    assert half.plan(3, 4) == ((False, False), (False, False), (True, True))  # turns on before the third


@pytest.mark.parametrize("queue_length,batch_size,world_size,rows", [(0, 64, 1, 0), (120, 128, 1, 0),
                                                                    (3840, 128, 1, 3840), (3840, 128, 4, 896),
                                                                    (1000, 64, 2, 448)])
def test_queue_rows_divide_by_the_global_batch(queue_length, batch_size, world_size, rows):
    cfg = SwavConfig(queue_length=queue_length, batch_size=batch_size, world_size=world_size)
    assert cfg.queue_rows == rows


def test_pair_sizes_of_the_config():
    assert SwavConfig(nmb_crops=(2, 4), size_crops=(32, 16)).pair_sizes == [(32, 32), (16, 16), (16, 16)]
    assert SwavConfig(run_swav=True).pair_sizes == []
