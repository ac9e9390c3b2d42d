"""LARC (layer-wise adaptive rate control) around an optimiser, with apex's semantics, no apex needed.

docs/released-behaviour.md, item 10: for every parameter with a gradient, when ||p|| != 0 and ||g|| != 0,
    a = trust * ||p|| / (||g|| + wd ||p|| + eps),   g <- (g + wd p) * a
(with clip: a <- min(a / lr, 1)); the inner optimiser then steps with weight decay 0, which is restored
afterwards. Biases and BN parameters are included, as released.

The per-parameter arithmetic runs as a handful of multi-tensor (`torch._foreach_*`) operations on all
parameters at once; on the CPU it gives bit for bit what a loop over the parameters gives.
"""
import torch


def build_optimizer(params, lr, momentum=0.9, weight_decay=1e-6, trust_coefficient=0.001, clip=False):
    """The released optimiser: SGD with momentum inside LARC (trust 0.001, no clipping). The fused SGD
    kernel updates all parameters in one launch and can skip a step on the device (`found_inf`)."""
    sgd = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=True)
    return LARC(sgd, trust_coefficient=trust_coefficient, clip=clip)


class LARC:
    def __init__(self, optimizer, trust_coefficient=0.02, clip=True, eps=1e-8):
        self.optim = optimizer
        self.trust_coefficient = trust_coefficient
        self.clip = clip
        self.eps = eps

    # The wrapper exposes the inner optimiser's state, so torch.amp.GradScaler and LR code work on it.
    @property
    def param_groups(self):
        return self.optim.param_groups

    @property
    def state(self):
        return self.optim.state

    @property
    def defaults(self):
        return self.optim.defaults

    def state_dict(self):
        return self.optim.state_dict()

    def load_state_dict(self, state_dict):
        self.optim.load_state_dict(state_dict)
        self.match_parameter_layouts()

    def match_parameter_layouts(self):
        """Lay each momentum buffer out as its parameter (same values). A file can hold them contiguous beside
        channels_last parameters (a released checkpoint, a run started without --channels_last), and the
        fused SGD kernel steps parameters, gradients and buffers as arrays of equal strides: on the CPU it
        mixes up their elements, on CUDA it refuses them."""
        for group in self.optim.param_groups:
            for p in group["params"]:
                buf = self.optim.state[p].get("momentum_buffer") if p in self.optim.state else None
                # a buffer of another shape is left as it is, for the checkpoint's check to name it
                if isinstance(buf, torch.Tensor) and buf.shape == p.shape and buf.stride() != p.stride():
                    self.optim.state[p]["momentum_buffer"] = torch.empty_like(p).copy_(buf)

    def zero_grad(self, set_to_none=True):
        self.optim.zero_grad(set_to_none=set_to_none)

    def __repr__(self):
        return f"LARC(trust_coefficient={self.trust_coefficient}, clip={self.clip}, {self.optim!r})"

    @torch.no_grad()
    def scale_gradients(self, group, weight_decay):
        """g <- (g + wd p) * a for the parameters of `group` that LARC applies to, in place. Returns the
        gradients' norms (one tensor), which tell whether any gradient is non-finite."""
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return None
        grads = [p.grad for p in params]
        param_norm = torch.stack(torch._foreach_norm(params))
        grad_norm = torch.stack(torch._foreach_norm(grads))
        adaptive_lr = self.trust_coefficient * param_norm / (grad_norm + param_norm * weight_decay + self.eps)
        if self.clip:
            adaptive_lr = torch.clamp(adaptive_lr / group["lr"], max=1)
        # apex's `if param_norm != 0 and grad_norm != 0`, without a host sync: elsewhere g * 1 + 0 p = g
        apply = (param_norm != 0) & (grad_norm != 0)
        if weight_decay != 0:
            decay = torch.where(apply, weight_decay, 0.0).to(param_norm.dtype)
            torch._foreach_add_(grads, torch._foreach_mul(params, decay.unbind(0)))
        torch._foreach_mul_(grads, torch.where(apply, adaptive_lr, 1.0).unbind(0))
        return grad_norm

    def create_momentum_buffers(self):
        """Zero momentum buffers for the parameters with a gradient and none yet (see `step`)."""
        for group in self.optim.param_groups:
            if group.get("momentum", 0):
                for p in group["params"]:
                    if p.grad is not None and self.optim.state[p].get("momentum_buffer") is None:
                        self.optim.state[p]["momentum_buffer"] = torch.zeros_like(p)

    # torch.amp.GradScaler hands such an optimiser its found_inf instead of reading it on the host
    _step_supports_amp_scaling = True

    @torch.no_grad()
    def step(self, closure=None, found_inf=None, check_finite=False, lr=None):
        """One LARC step. The step changes nothing where `found_inf` (a float tensor on the parameters'
        device; a GradScaler's is added when `scaler.step` calls this) is non-zero, or with `check_finite`
        where a gradient is not finite. The fused SGD kernel decides that on the device; another inner
        optimiser reads the flag on the host. Returns the flag (None when there is none). `lr`: this
        step's learning rate as a device tensor (the fused kernel reads it there, so a captured step can
        replay with another one); the groups' own `lr` is used otherwise, and kept as it is.

        With the fused kernel, momentum buffers are created as zeros before their parameter's first
        step: the same update as SGD's copy of the first gradient; nothing uninitialised is left behind
        when that first step is skipped; and the kernel, which takes all buffers or none, also steps a
        parameter whose first gradient comes late (the prototypes after their freeze)."""
        grad_scale = getattr(self, "grad_scale", None)  # GradScaler.step without unscale_: unscale here
        inv_scale = None if grad_scale is None else grad_scale.double().reciprocal().float()
        scaler_found_inf = getattr(self, "found_inf", None)
        if scaler_found_inf is not None:
            found_inf = scaler_found_inf if found_inf is None else torch.maximum(found_inf, scaler_found_inf)
        fused = all(g.get("fused") for g in self.optim.param_groups)
        weight_decays, lrs = [], [g["lr"] for g in self.optim.param_groups]
        try:
            for group in self.optim.param_groups:
                wd = group.get("weight_decay", 0)
                weight_decays.append(wd)
                group["weight_decay"] = 0
                if lr is not None:
                    group["lr"] = lr
                if inv_scale is not None:
                    grads = [p.grad for p in group["params"] if p.grad is not None]
                    if grads:
                        torch._foreach_mul_(grads, inv_scale)
                grad_norm = self.scale_gradients(group, wd)
                if check_finite and grad_norm is not None:
                    bad = (~torch.isfinite(grad_norm)).any().float()
                    found_inf = bad if found_inf is None else torch.maximum(found_inf, bad)
            if fused:
                self.create_momentum_buffers()
                if found_inf is not None:
                    self.optim.found_inf = found_inf
                self.optim.step()
            elif found_inf is None or not found_inf.item():
                self.optim.step()
            return found_inf
        finally:
            self.optim.__dict__.pop("found_inf", None)
            for group, wd, group_lr in zip(self.optim.param_groups, weight_decays, lrs):
                group["weight_decay"], group["lr"] = wd, group_lr
