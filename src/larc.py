"""LARC (layer-wise adaptive rate control) around an optimiser, with apex's semantics, no apex needed.

Behaviour doc, item 10: for every parameter with a gradient, when ||p|| != 0 and ||g|| != 0,
    a = trust * ||p|| / (||g|| + wd ||p|| + eps),   g <- (g + wd p) * a
(with clip: a <- min(a / lr, 1)); the inner optimiser then steps with weight decay 0, which is restored
afterwards. Biases and BN parameters are included, as released.
"""
import torch


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

    def zero_grad(self, set_to_none=True):
        self.optim.zero_grad(set_to_none=set_to_none)

    def __repr__(self):
        return f"LARC(trust_coefficient={self.trust_coefficient}, clip={self.clip}, {self.optim!r})"

    @torch.no_grad()
    def step(self, closure=None):
        weight_decays = []
        for group in self.optim.param_groups:
            wd = group.get("weight_decay", 0)
            weight_decays.append(wd)
            group["weight_decay"] = 0
            for p in group["params"]:
                if p.grad is None:
                    continue
                param_norm = torch.norm(p)
                grad_norm = torch.norm(p.grad)
                # Branch-free form of apex's `if param_norm != 0 and grad_norm != 0`: no host sync.
                adaptive_lr = self.trust_coefficient * param_norm / (grad_norm + param_norm * wd + self.eps)
                if self.clip:
                    adaptive_lr = torch.clamp(adaptive_lr / group["lr"], max=1)
                apply = (param_norm != 0) & (grad_norm != 0)
                scaled = (p.grad + wd * p) * adaptive_lr
                p.grad.copy_(torch.where(apply, scaled, p.grad))
        try:
            return self.optim.step(closure) if closure is not None else self.optim.step()
        finally:
            for group, wd in zip(self.optim.param_groups, weight_decays):
                group["weight_decay"] = wd
