"""The released ResNet family: names, shapes, stem, init, heads, multi-resolution forward."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from src.method.resnet import ARCHS, Bottleneck, build_model, resnet18

THREADS = 1  # small tensors: one intra-op thread (tests/conftest.py)


def tiny(**kw):
    args = dict(width_per_group=8, output_dim=16, hidden_mlp=32, nmb_prototypes=10, normalize=True)
    args.update(kw)
    return resnet18(**args)


def expected_backbone_keys(layers):
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = {"conv1.weight"} | {f"bn1.{s}" for s in bn}
    for n, blocks in enumerate(layers, start=1):
        for i in range(blocks):
            pre = f"layer{n}.{i}."
            for j in (1, 2, 3):
                keys.add(pre + f"conv{j}.weight")
                keys |= {pre + f"bn{j}.{s}" for s in bn}
            if i == 0:  # every first block changes the channel count (and layers 2-4 the stride)
                keys.add(pre + "downsample.0.weight")
                keys |= {pre + f"downsample.1.{s}" for s in bn}
    return keys


def test_state_dict_names_are_the_released_ones():
    m = tiny()
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    expected = expected_backbone_keys([2, 2, 2, 2])
    expected |= {"projection_head.0.weight", "projection_head.0.bias", "projection_head.3.weight",
                 "projection_head.3.bias", "prototypes.weight"}
    expected |= {f"projection_head.1.{s}" for s in bn}
    assert set(m.state_dict()) == expected
    sd = m.state_dict()
    assert sd["projection_head.0.weight"].shape == (32, m.feature_dim)
    assert sd["projection_head.3.weight"].shape == (16, 32)
    assert sd["prototypes.weight"].shape == (10, 16)


def test_list_of_prototypes_gives_numbered_heads():
    m = tiny(nmb_prototypes=[5, 7])
    sd = m.state_dict()
    assert "prototypes.weight" not in sd
    assert sd["prototypes.prototypes0.weight"].shape == (5, 16)
    assert sd["prototypes.prototypes1.weight"].shape == (7, 16)
    emb, scores = m([torch.randn(3, 3, 16, 16)])
    assert isinstance(scores, list) and [s.shape for s in scores] == [(3, 5), (3, 7)]
    assert torch.allclose(scores[1], emb @ sd["prototypes.prototypes1.weight"].t(), atol=1e-6)


def test_resnet18_is_bottleneck_2222_with_2048_features():
    m = resnet18()  # full width
    assert m.feature_dim == 2048
    for n in range(1, 5):
        layer = getattr(m, f"layer{n}")
        assert len(layer) == 2
        assert all(isinstance(b, Bottleneck) for b in layer)
    assert m.layer4[-1].conv3.out_channels == 2048
    assert m.projection_head is None and m.prototypes is None
    feats = m(torch.randn(2, 3, 32, 32))
    assert feats.shape == (2, 2048)


@pytest.mark.parametrize("arch,dim,stem", [("resnet18", 2048, 64), ("resnet50", 2048, 64),
                                           ("resnet50w2", 4096, 128), ("resnet50w4", 8192, 256),
                                           ("resnet50w5", 10240, 320)])
def test_family_feature_dims(arch, dim, stem):
    with torch.device("meta"):
        m = build_model(arch, output_dim=128, hidden_mlp=2048, nmb_prototypes=3000)
    assert m.feature_dim == dim
    assert m.conv1.weight.shape == (stem, 3, 3, 3)
    assert m.layer1[0].conv2.weight.shape == (stem, stem, 3, 3)  # bottleneck width = planes at 64/group
    assert m.layer4[-1].conv3.weight.shape[0] == dim
    assert m.projection_head[0].weight.shape == (2048, dim)
    expected_layers = [2, 2, 2, 2] if arch == "resnet18" else [3, 4, 6, 3]
    assert [len(getattr(m, f"layer{n}")) for n in range(1, 5)] == expected_layers


def test_stem_pads_then_3x3_stride1_and_layer4_is_5x5():
    m = tiny(output_dim=0, nmb_prototypes=0, normalize=False, eval_mode=True)
    assert isinstance(m.padding, nn.ConstantPad2d) and m.padding.padding == (1, 1, 1, 1)
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1) and m.conv1.padding == (1, 1)
    assert not any(isinstance(mod, nn.MaxPool2d) for mod in m.modules())
    seen = {}

    def record(key, use_input):
        def hook(mod, inp, out):
            seen[key] = (inp[0] if use_input else out).shape
        return hook

    m.conv1.register_forward_hook(record("in", True))
    m.layer1.register_forward_hook(record("l1", False))
    out = m(torch.randn(2, 3, 32, 32))
    assert seen["in"][-2:] == (34, 34)       # padded by one pixel before the conv
    assert seen["l1"][-2:] == (34, 34)       # stride 1, no max-pool
    assert out.shape == (2, m.feature_dim, 5, 5)
    # with eval_mode off the same map is average-pooled and flattened
    m.eval()
    x = torch.randn(1, 3, 32, 32)
    fmap = m(x)
    m.eval_mode = False
    pooled = m(x)
    assert pooled.shape == (1, m.feature_dim)
    assert torch.allclose(pooled, fmap.mean(dim=(2, 3)), atol=1e-6)


def test_init_kaiming_fan_out_and_bn_constants():
    torch.manual_seed(0)
    m = resnet18()
    w = m.layer4[0].conv2.weight  # 512 x 512 x 3 x 3
    fan_out = w.shape[0] * w.shape[2] * w.shape[3]
    assert w.std().item() == pytest.approx(math.sqrt(2.0 / fan_out), rel=0.02)
    assert abs(w.mean().item()) < 1e-3
    w1 = m.layer4[0].conv1.weight  # 1x1, 512 x 1024: fan_out = 512 (fan_in would give sqrt(2/1024))
    assert w1.std().item() == pytest.approx(math.sqrt(2.0 / 512), rel=0.02)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            assert torch.all(mod.weight == 1) and torch.all(mod.bias == 0)


def test_zero_init_residual():
    m0 = tiny(zero_init_residual=False)
    m1 = tiny(zero_init_residual=True)
    blocks0 = [b for b in m0.modules() if isinstance(b, Bottleneck)]
    blocks1 = [b for b in m1.modules() if isinstance(b, Bottleneck)]
    assert len(blocks1) == 8
    assert all(torch.all(b.bn3.weight == 1) for b in blocks0)
    assert all(torch.all(b.bn3.weight == 0) for b in blocks1)
    assert all(torch.all(b.bn1.weight == 1) and torch.all(b.bn2.weight == 1) for b in blocks1)
    # a zero-initialised residual block without downsample is the identity on non-negative inputs
    x = torch.rand(2, m1.layer2[1].conv1.in_channels, 6, 6)
    assert torch.equal(m1.layer2[1](x.clone()), x)
    assert not torch.allclose(m0.layer2[1](x.clone()), x)


def test_head_variants():
    none = tiny(output_dim=0, hidden_mlp=0, nmb_prototypes=0, normalize=False)
    assert none.projection_head is None
    x = torch.randn(3, 3, 16, 16)
    out = none([x])
    assert torch.is_tensor(out) and out.shape == (3, none.feature_dim)

    lin = tiny(output_dim=12, hidden_mlp=0, nmb_prototypes=0, normalize=False)
    assert isinstance(lin.projection_head, nn.Linear)
    assert lin.projection_head.weight.shape == (12, lin.feature_dim)
    assert lin([x]).shape == (3, 12)

    mlp = tiny(output_dim=12, hidden_mlp=20, nmb_prototypes=0)
    head = mlp.projection_head
    assert [type(h) for h in head] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert head[0].weight.shape == (20, mlp.feature_dim) and head[1].num_features == 20
    assert head[3].weight.shape == (12, 20)


def test_normalize_gives_unit_embeddings_and_scores_from_them():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    m = tiny(normalize=True)
    emb, scores = m([x])
    assert torch.allclose(emb.norm(dim=1), torch.ones(4), atol=1e-5)
    assert torch.allclose(scores, emb @ m.prototypes.weight.t(), atol=1e-6)
    raw = tiny(normalize=False)
    raw.load_state_dict(m.state_dict())
    emb_raw, _ = raw([x])
    assert not torch.allclose(emb_raw.norm(dim=1), torch.ones(4), atol=1e-2)
    assert torch.allclose(F.normalize(emb_raw, dim=1), emb, atol=1e-5)


def test_multi_resolution_forward_groups_consecutive_equal_sizes():
    torch.manual_seed(0)
    m = tiny()
    m.train()  # BN batch statistics make the grouping observable
    a, b = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    c = torch.randn(4, 3, 8, 8)
    emb, scores = m([a, b, c])
    with torch.no_grad():
        feats = torch.cat([m.forward_backbone(torch.cat([a, b])), m.forward_backbone(c)])
        emb_ref, scores_ref = m.forward_head(feats)
        # one backbone pass per crop would differ (different BN batches)
        sep = torch.cat([m.forward_backbone(a), m.forward_backbone(b), m.forward_backbone(c)])
        emb_sep, _ = m.forward_head(sep)
    assert torch.allclose(emb, emb_ref, atol=1e-5) and torch.allclose(scores, scores_ref, atol=1e-5)
    assert not torch.allclose(emb, emb_sep, atol=1e-3)

    # equal sizes that are not consecutive are not grouped: [a, c, b] is three passes
    emb2, _ = m([a, c, b])
    with torch.no_grad():
        feats = torch.cat([m.forward_backbone(a), m.forward_backbone(c), m.forward_backbone(b)])
        emb2_ref, _ = m.forward_head(feats)
    assert torch.allclose(emb2, emb2_ref, atol=1e-5)


def test_single_tensor_input_is_one_crop():
    torch.manual_seed(0)
    m = tiny()
    x = torch.randn(4, 3, 16, 16)
    e1, s1 = m(x)
    e2, s2 = m([x])
    assert torch.allclose(e1, e2) and torch.allclose(s1, s2)


def test_unknown_arch_is_a_value_error():
    with pytest.raises(ValueError, match="resnet101"):
        build_model("resnet101")
    assert set(ARCHS) == {"resnet18", "resnet50", "resnet50w2", "resnet50w4", "resnet50w5"}


def test_forward_compiles_without_graph_breaks():
    """Grouping crops by resolution is plain Python on shapes: torch.compile traces one graph."""
    import torch._dynamo
    torch._dynamo.reset()
    net = resnet18(width_per_group=8, output_dim=16, hidden_mlp=32, nmb_prototypes=10, normalize=True)
    explained = torch._dynamo.explain(net)([torch.randn(4, 3, 16, 16) for _ in range(3)] + [torch.randn(4, 3, 8, 8)])
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
