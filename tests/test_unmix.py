"""Un-Mix draws, boxes and mixtures; the SwAV loss with its queue; the Un-Mix SwAV loss."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from src.method.unmix import (
    EmbeddingQueue,
    SwavConfig,
    UnmixDraws,
    draw_unmix,
    mix_with_reversed,
    pair_sizes,
    region_box,
    swav_loss,
    unmix_inputs,
    unmix_swav_loss,
    unmix_views,
)

EPS, T, ITERS = 0.05, 0.1, 3


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


# ---------------------------------------------------------------- boxes and mixtures

@pytest.mark.parametrize("w,h,lam,cx,cy,box", [
    (32, 32, 0.75, 16, 16, (8, 8, 24, 24)),      # cut 0.5 -> 16 x 16, centred
    (32, 32, 0.75, 0, 0, (0, 0, 8, 8)),          # clipped at the low border
    (32, 32, 0.75, 31, 2, (23, 0, 32, 10)),      # clipped at the high border (x) and low (y)
    (32, 32, 0.0, 16, 16, (0, 0, 32, 32)),       # cut 1: the whole image
    (32, 32, 1.0, 5, 7, (5, 7, 5, 7)),           # cut 0: empty box
    (10, 10, 0.51, 5, 5, (2, 2, 8, 8)),          # cut_w = int(7.0000001) = 7, 7 // 2 = 3 each side: 6 wide
    (8, 4, 0.75, 7, 0, (5, 0, 8, 1)),            # non-square: cut_w = 4, cut_h = 2
])
def test_region_box(w, h, lam, cx, cy, box):
    assert region_box(w, h, lam, cx, cy) == box


def test_mix_global_is_lam_x_plus_reversed():
    x = torch.arange(3 * 1 * 2 * 2, dtype=torch.float32).reshape(3, 1, 2, 2)
    lam = 0.3
    mixed, used = mix_with_reversed(x, lam, global_mix=True)
    assert used == lam
    for i in range(3):
        assert torch.allclose(mixed[i], lam * x[i] + (1 - lam) * x[2 - i])
    assert torch.equal(x, torch.arange(12, dtype=torch.float32).reshape(3, 1, 2, 2))


def test_mix_region_pastes_the_reversed_box_and_adjusts_lam():
    # size[2] = 4 rows ("W" in the released code), size[3] = 6 columns ("H")
    x = torch.stack([torch.zeros(1, 4, 6), torch.ones(1, 4, 6)])
    # lam 0.75 -> cut 0.5 -> cut_w = 2 (dim 2), cut_h = 3 (dim 3); centre (3, 0):
    # x1 = 2, x2 = min(4, 4) = 4, y1 = max(-1, 0) = 0, y2 = 1 -> 2 x 1 box
    mixed, lam = mix_with_reversed(x, 0.75, global_mix=False, center=(3, 0))
    expected0 = torch.tensor([[0, 0, 0, 0, 0, 0],
                              [0, 0, 0, 0, 0, 0],
                              [1, 0, 0, 0, 0, 0],
                              [1, 0, 0, 0, 0, 0]], dtype=torch.float32)
    assert torch.equal(mixed[0, 0], expected0)
    assert torch.equal(mixed[1, 0], 1 - expected0)
    assert lam == pytest.approx(1 - 2 * 1 / 24)
    assert torch.equal(x[0], torch.zeros(1, 4, 6))  # input untouched


def test_unmix_inputs_order_global():
    bs = 4
    crops = [torch.full((bs, 3, 8, 8), float(v)) + torch.arange(bs).view(bs, 1, 1, 1) for v in (0, 10, 20, 30)]
    inputs, lam = unmix_inputs(crops, UnmixDraws(r=0.1, lam=0.7), unmix_prob=0.5)
    assert lam == 0.7
    assert len(inputs) == 6
    for got, want in zip([inputs[0], inputs[1], inputs[3], inputs[4]], crops):
        assert torch.equal(got, want)
    for m, src in ((inputs[2], crops[0]), (inputs[5], crops[2])):
        assert torch.allclose(m, 0.7 * src + 0.3 * torch.flip(src, dims=[0]))


def test_unmix_inputs_region_lam_of_pair0_sizes_pair1():
    crops = [torch.stack([torch.zeros(3, 32, 32), torch.ones(3, 32, 32)]) for _ in range(4)]
    draws = UnmixDraws(r=0.9, lam=0.75, centers=[(0, 0), (30, 16)])
    inputs, lam = unmix_inputs(crops, draws, unmix_prob=0.5)
    # pair 0: cut 0.5 -> 16, box (0, 0, 8, 8) -> lam' = 1 - 64 / 1024 = 0.9375
    expected = torch.zeros(32, 32)
    expected[0:8, 0:8] = 1
    assert torch.equal(inputs[2][0, 0], expected)
    # pair 1 uses lam' (cut 0.25 -> 8), not 0.75: box x 26..32 (clipped), y 12..20
    expected = torch.zeros(32, 32)
    expected[26:32, 12:20] = 1
    assert torch.equal(inputs[5][0, 1], expected)
    assert lam == pytest.approx(1 - 6 * 8 / 1024)


def test_odd_number_of_crops_is_a_value_error():
    crops = [torch.zeros(2, 3, 8, 8)] * 3
    with pytest.raises(ValueError, match="pairs"):
        unmix_inputs(crops, UnmixDraws(r=0.1, lam=0.5), 0.5)


def seeds_by_mode():
    glob, region = None, None
    for seed in range(100):
        r = np.random.RandomState(seed).rand(1)[0]
        if r < 0.5 and glob is None:
            glob = seed
        if r >= 0.5 and region is None:
            region = seed
    return glob, region


@pytest.mark.parametrize("mode", ["global", "region"])
def test_draw_unmix_consumes_the_released_sequence(mode):
    seed = seeds_by_mode()[mode == "region"]
    sizes = [(32, 8), (16, 4)]
    rng = np.random.RandomState(seed)
    d = draw_unmix(rng, 1.0, 0.5, sizes)
    ref = np.random.RandomState(seed)
    r = ref.rand(1)[0]
    lam = ref.beta(1.0, 1.0)
    assert d.r == r and d.lam == lam
    if mode == "global":
        assert r < 0.5 and d.centers is None
    else:
        assert r >= 0.5
        centers = []
        for w, h in sizes:
            cx = ref.randint(w)
            cy = ref.randint(h)
            centers.append((cx, cy))
        assert d.centers == centers
    # both streams are at the same point afterwards
    assert rng.randint(1 << 30) == ref.randint(1 << 30)


def test_draw_unmix_without_pairs_draws_r_and_lam_only():
    """Plain SwAV (no pairs) still consumes r and lam, and nothing else, in region mode too."""
    seed = seeds_by_mode()[1]
    rng, ref = np.random.RandomState(seed), np.random.RandomState(seed)
    d = draw_unmix(rng, 1.0, 0.5, [])
    assert d.r == ref.rand(1)[0] and d.lam == ref.beta(1.0, 1.0)
    assert d.centers == []
    assert rng.randint(1 << 30) == ref.randint(1 << 30)


def test_pair_sizes():
    crops = [torch.zeros(2, 3, 32, 24), torch.zeros(2, 3, 32, 24), torch.zeros(2, 3, 16, 12),
             torch.zeros(2, 3, 16, 12)]
    assert pair_sizes(crops) == [(32, 24), (16, 12)]


def split_triples(t, bs, n_pairs):
    """Reference: rows [x0, x1, m0, x2, x3, m1, ...] -> plain [x0, x1, x2, x3, ...], mixed [m0, x1, m1, x3, ...]."""
    plain, mixed = [], []
    for p in range(n_pairs):
        o = 3 * p * bs
        plain += [t[o:o + bs], t[o + bs:o + 2 * bs]]
        mixed += [t[o + 2 * bs:o + 3 * bs], t[o + bs:o + 2 * bs]]
    return torch.cat(plain), torch.cat(mixed)


def test_unmix_views():
    # blocks x0, x1, m0, x2, x3, m1 = 0..5
    assert unmix_views(1) == ((0, 1), (2, 1))
    assert unmix_views(2) == ((0, 1, 3, 4), (2, 1, 5, 4))


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
