"""torch.hub entry points: the released CIFAR ResNets, with weights from a checkpoint of this project, of
the released code, or from tools/export_backbone.py.

    import torch
    backbone = torch.hub.load("path/to/this/repo", "resnet18", source="local",
                              pretrained="experiments/run/checkpoint.pth.tar").eval()
    features = backbone(images)            # N x 2048 pooled features (resnet18 at width 64)

Each entry takes `pretrained` (False: random weights; or the path of a checkpoint), `full_model` (False:
the backbone, whose forward returns the average-pooled features; True: with the projection head and
prototypes, whose forward returns `(embedding, prototype scores)` as in pretraining; from a checkpoint of
eval_semisup.py, the fine-tuned classifier, which returns logits) and the keywords of
`src.method.resnet.ResNet` (e.g. `width_per_group`). With a checkpoint, the width and the head's sizes are read
from its weights (given keywords must agree), and every tensor the returned network has must be in it.
Nothing is downloaded: the released weights are links to Google Drive; download them and pass the path.
"""
import hashlib
import importlib
import importlib.util
import os
import sys

dependencies = ["torch", "numpy"]

_HERE = os.path.dirname(os.path.abspath(__file__))


def _import_src():
    """This repository's `src` package under a private name, so that a package called `src` in the
    calling project (a common name) neither hides it nor is replaced by it."""
    name = "_unmix_swav_src_" + hashlib.sha1(_HERE.encode()).hexdigest()[:8]
    if name not in sys.modules:
        init = os.path.join(_HERE, "src", "__init__.py")
        spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[os.path.dirname(init)])
        package = importlib.util.module_from_spec(spec)
        sys.modules[name] = package
        spec.loader.exec_module(package)
    return importlib.import_module(name + ".method.resnet"), importlib.import_module(name + ".eval.pretrained")


def _build(arch, pretrained, full_model, kwargs):
    resnet, weights = _import_src()
    if pretrained is True:
        raise ValueError("pretrained=True: there are no weights to download; pass the path of a checkpoint "
                         "(the released weights are on Google Drive, linked from the released repository's README)")
    if not pretrained:
        return resnet.build_model(arch, **_with_normalize(kwargs, full_model))
    state, info = weights.read_state_dict(pretrained)
    found = weights.network_config(pretrained, state, info)  # what eval_linear.py and eval_semisup.py read too
    found_arch, width = found.pop("arch"), found["width_per_group"]
    if not full_model:
        found = {"width_per_group": width}
    if full_model and "output_dim" not in found:
        raise ValueError(f"full_model=True but {pretrained} holds a backbone only (no projection head)")
    if found_arch != arch:
        raise ValueError(f"{pretrained} holds a {found_arch} (width {width}), not a {arch}: "
                         f"load it with the '{found_arch}' entry")
    for key, value in found.items():
        if kwargs.setdefault(key, value) != value:
            raise ValueError(f"{key}={kwargs[key]!r} but {pretrained} has {key}={value!r}")
    model = resnet.build_model(arch, **_with_normalize(kwargs, full_model))
    weights.load_weights(model, state, optional=())
    return model


def _with_normalize(kwargs, full_model):
    """A network with prototypes L2-normalises its embedding, as in pretraining (a fine-tuned classifier
    of eval_semisup.py has none and returns plain logits)."""
    if full_model:
        kwargs.setdefault("normalize", bool(kwargs.get("nmb_prototypes")))
    return kwargs


def resnet18(pretrained=False, full_model=False, **kwargs):
    """The released `resnet18` (Bottleneck blocks, layers [2, 2, 2, 2], 2048-d features at width 64)."""
    return _build("resnet18", pretrained, full_model, kwargs)


def resnet50(pretrained=False, full_model=False, **kwargs):
    """ResNet-50 (Bottleneck, layers [3, 4, 6, 3]) with the CIFAR stem."""
    return _build("resnet50", pretrained, full_model, kwargs)


def resnet50w2(pretrained=False, full_model=False, **kwargs):
    """ResNet-50 widened 2 times, CIFAR stem."""
    return _build("resnet50w2", pretrained, full_model, kwargs)


def resnet50w4(pretrained=False, full_model=False, **kwargs):
    """ResNet-50 widened 4 times, CIFAR stem."""
    return _build("resnet50w4", pretrained, full_model, kwargs)


def resnet50w5(pretrained=False, full_model=False, **kwargs):
    """ResNet-50 widened 5 times, CIFAR stem."""
    return _build("resnet50w5", pretrained, full_model, kwargs)
