"""The DeepHEMNMA regressor: a ResNet feature extractor and the paper's MLP (seed 000 §2.2).

Architecture (one *branch*)::

    image (B, 1, D, D) → torchvision ResNet (1-channel stem, classifier removed)
        → 512·e features (e = 1 for resnet10/18/34, 4 for resnet50)
        → Linear(·, 1000) → ReLU → Dropout(p)       ┐
        → Linear(1000, 512) → ReLU → Dropout(p)     │ the paper's 4-layer MLP:
        → Linear(512, 128) → ReLU → Dropout(p)      │ 1000, 512, 128 hidden nodes,
        → Linear(128, k)                            ┘ linear outputs

Heads: ``amplitudes`` (M values), ``quaternion`` (4 values, normalised to unit length:
the orientation as a unit quaternion; q and −q are the same rotation and the losses in
:mod:`.targets` treat them alike) and ``shifts`` (2 values). Amplitudes and shifts are
predicted in standardised units (see :class:`.targets.TargetCodec`).

``mode="separate"`` is the paper: three branches, one per parameter type, each with its
own ResNet. Summing their losses and optimising all parameters with one Adam(W) optimiser
is exactly training the three models independently (Adam's update of a parameter only
depends on that parameter's gradient, and each branch's gradient only on its own loss).
``mode="joint"`` is one branch whose last layer has M + 4 + 2 outputs, trained on a
weighted sum of the three losses (3× less compute for training and inference).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

HEADS = ("amplitudes", "quaternion", "shifts")
ARCHS = ("resnet10", "resnet18", "resnet34", "resnet50")
MODES = ("joint", "shared", "separate")


@dataclass
class ModelConfig:
    """Everything needed to rebuild the network (stored in every checkpoint)."""

    n_amplitudes: int
    arch: str = "resnet34"
    mode: str = "joint"            # "joint" or "separate"
    hidden: tuple[int, ...] = (1000, 512, 128)
    dropout: float = 0.5
    in_channels: int = 1

    def __post_init__(self):
        self.hidden = tuple(int(h) for h in self.hidden)
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.n_amplitudes < 0:
            raise ValueError("n_amplitudes must be >= 0")

    def head_sizes(self) -> dict[str, int]:
        sizes = {"amplitudes": self.n_amplitudes, "quaternion": 4, "shifts": 2}
        return {k: v for k, v in sizes.items() if v > 0}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return cls(**d)


def build_backbone(arch: str, in_channels: int = 1) -> tuple[nn.Module, int]:
    """A torchvision ResNet with an ``in_channels`` stem and no classifier: (module, n_features)."""
    from torchvision.models import resnet
    from torchvision.models.resnet import BasicBlock, ResNet

    if arch == "resnet10":  # [1, 1, 1, 1] basic blocks: for tests and small CPU runs
        net = ResNet(BasicBlock, [1, 1, 1, 1])
    else:
        net = getattr(resnet, arch)(weights=None)
    net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    n_features = net.fc.in_features
    net.fc = nn.Identity()
    return net, n_features


def build_mlp(n_in: int, hidden, dropout: float, n_out: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    n = n_in
    for h in hidden:
        layers += [nn.Linear(n, h), nn.ReLU(inplace=True), nn.Dropout(dropout)]
        n = h
    layers.append(nn.Linear(n, n_out))
    return nn.Sequential(*layers)


class Branch(nn.Module):
    """ResNet features → MLP → ``n_out`` linear outputs."""

    def __init__(self, cfg: ModelConfig, n_out: int):
        super().__init__()
        self.features, n = build_backbone(cfg.arch, cfg.in_channels)
        self.mlp = build_mlp(n, cfg.hidden, cfg.dropout, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.features(x))


class SharedBranch(nn.Module):
    """One ResNet, one MLP per head: ``forward -> {head: outputs}``."""

    def __init__(self, cfg: ModelConfig, sizes: dict[str, int]):
        super().__init__()
        self.features, n = build_backbone(cfg.arch, cfg.in_channels)
        self.mlps = nn.ModuleDict({k: build_mlp(n, cfg.hidden, cfg.dropout, m) for k, m in sizes.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(x)
        return {k: mlp(f) for k, mlp in self.mlps.items()}


class DeepHEMNMANet(nn.Module):
    """``forward(images (B, 1, D, D)) -> {"amplitudes": (B, M), "quaternion": (B, 4), "shifts": (B, 2),
    "quaternion_raw": (B, 4)}``.

    ``quaternion`` is unit length (w sign arbitrary), ``quaternion_raw`` the same output before
    normalisation (what the L1 loss sees: its gradient is not damped by the normalisation);
    amplitudes and shifts are standardised.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.sizes = cfg.head_sizes()
        if cfg.mode == "joint":
            self.branches = nn.ModuleDict({"joint": Branch(cfg, sum(self.sizes.values()))})
        elif cfg.mode == "shared":
            self.branches = nn.ModuleDict({"shared": SharedBranch(cfg, self.sizes)})
        else:
            self.branches = nn.ModuleDict({k: Branch(cfg, n) for k, n in self.sizes.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.cfg.mode == "joint":
            y = self.branches["joint"](x)
            out, o = {}, 0
            for k, n in self.sizes.items():
                out[k] = y[:, o:o + n]
                o += n
        elif self.cfg.mode == "shared":
            out = self.branches["shared"](x)
        else:
            out = {k: b(x) for k, b in self.branches.items()}
        q = out["quaternion"].float()
        out["quaternion_raw"] = q
        out["quaternion"] = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        return out


def build_model(cfg: ModelConfig) -> DeepHEMNMANet:
    return DeepHEMNMANet(cfg)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
