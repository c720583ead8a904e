"""Server optimizers (FedOpt, Reddi et al. 2021): the round's aggregated delta Δ is treated as a
negative pseudo-gradient and applied with momentum or adaptivity.

    none:       x ← x + η Δ                       (η = 1: plain aggregation)
    fedavgm:    m ← β1 m + Δ;              x ← x + η m
    fedadagrad: m ← β1 m + (1−β1) Δ;  v ← v + Δ²;                          x ← x + η m / (√v + τ)
    fedadam:    m ← β1 m + (1−β1) Δ;  v ← β2 v + (1−β2) Δ²;                x ← x + η m / (√v + τ)
    fedyogi:    m ← β1 m + (1−β1) Δ;  v ← v − (1−β2) Δ² sign(v − Δ²);     x ← x + η m / (√v + τ)

As in the paper there is no bias correction. The moments m and v live next to the global version
in `server_state.safetensors`, so the next round continues them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedtune.config import AggregationSettings

if TYPE_CHECKING:  # the step runs on torch tensors; a plain round (fedavg, no optimizer) never imports it
    import torch

STATE_FILE = "server_state.safetensors"


@dataclass
class ServerOptimizer:
    name: str
    lr: float
    beta1: float
    beta2: float
    tau: float

    @classmethod
    def from_settings(cls, settings: AggregationSettings) -> ServerOptimizer:
        return cls(settings.server_opt, settings.effective_server_lr(), settings.server_momentum,
                   settings.server_beta2, settings.server_tau)

    @property
    def plain(self) -> bool:
        """True when the step is x + Δ exactly (no state, lr 1)."""
        return self.name == "none" and self.lr == 1.0

    def params(self) -> dict:
        out = {"server_opt": self.name, "server_lr": self.lr}
        if self.name != "none":
            out["server_momentum"] = self.beta1
        if self.name in ("fedadagrad", "fedadam", "fedyogi"):
            out.update(server_beta2=self.beta2, server_tau=self.tau)
        return out

    def step(self, key: str, delta: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """The change to apply to the global tensor `key`; updates `state` (m/<key>, v/<key>) in place."""
        if self.name == "none":
            return delta.mul_(self.lr) if self.lr != 1.0 else delta
        import torch

        m = state.get(f"m/{key}")
        m = torch.zeros_like(delta) if m is None else m.to(torch.float32)
        if self.name == "fedavgm":
            m.mul_(self.beta1).add_(delta)
            state[f"m/{key}"] = m
            return m * self.lr
        m.mul_(self.beta1).add_(delta, alpha=1 - self.beta1)
        v = state.get(f"v/{key}")
        v = torch.zeros_like(delta) if v is None else v.to(torch.float32)
        square = delta.square()
        if self.name == "fedadagrad":
            v.add_(square)
        elif self.name == "fedadam":
            v.mul_(self.beta2).add_(square, alpha=1 - self.beta2)
        else:  # fedyogi
            v.sub_((1 - self.beta2) * square * torch.sign(v - square))
        state[f"m/{key}"], state[f"v/{key}"] = m, v
        return self.lr * m / (v.sqrt() + self.tau)
