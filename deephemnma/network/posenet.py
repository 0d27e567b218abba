"""Pose + conformation network: orientation as a distribution over an SO(3) grid
(:mod:`.so3`), amplitudes and shifts as regression heads (issue 16).

Architecture::

    image (B, 1, d, d) → downsample to input_box² (average pooling, or Fourier crop)
        → backbone (a torchvision ResNet with a 1-channel stem, :func:`.model.build_backbone`,
          or ``convnet``: a small plain CNN, cheaper on CPU) → features (B, f)
        → pose head:  Linear(f, h) → ReLU → Linear(h, n_grid)     logits over the grid
        → amplitude head: Linear(f, h) → ReLU → Linear(h, M)      standardised amplitudes
        → shift head: Linear(f, h) → ReLU → Linear(h, 2)          origins / shift_scale

Amplitudes are predicted standardised by the prior's mean and standard deviation, shifts in
units of ``shift_scale`` Å (both stored in the model as buffers, so a checkpoint is
self-contained). :meth:`PoseNet.predict` returns rotations (decoded by the grid), amplitudes
and origins in physical units.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .model import build_backbone
from .so3 import SO3Grid


@dataclass
class PoseNetConfig:
    """Everything needed to rebuild the network."""

    n_amplitudes: int
    arch: str = "resnet18"          # resnet10/18/34/50 or convnet
    input_box: int = 32
    downsample: str = "avg"         # avg | fourier
    n_directions: int = 192
    n_inplane: int = 24
    hidden: int = 512
    width: int = 32                 # convnet: channels of the first stage
    stem_stride: int = 2            # resnets: stride of the 7×7 stem
    maxpool: bool = True            # resnets: keep the stem's max-pool

    def to_dict(self) -> dict:
        return asdict(self)


def build_convnet(width: int) -> tuple[nn.Module, int]:
    """Plain CNN: 4 stages of two 3×3 conv + BN + ReLU, ×2 channels and /2 size per stage,
    global average pooling. Returns (module, n_features)."""
    layers, c_in = [], 1
    for s in range(4):
        c = width * 2 ** s
        for j in range(2):
            layers += [nn.Conv2d(c_in if j == 0 else c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
        c_in = c
        if s < 3:
            layers.append(nn.MaxPool2d(2))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers), c_in


def backbone_for(cfg: PoseNetConfig) -> tuple[nn.Module, int]:
    if cfg.arch == "convnet":
        return build_convnet(cfg.width)
    net, n = build_backbone(cfg.arch, 1)
    if cfg.stem_stride != 2:
        net.conv1.stride = (cfg.stem_stride, cfg.stem_stride)
    if not cfg.maxpool:
        net.maxpool = nn.Identity()
    return net, n


def head(n_in: int, hidden: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, n_out))


class PoseNet(nn.Module):
    """``forward(images (B,1,d,d)) -> {"pose_logits" (B, n_grid), "amplitudes" (B, M)
    standardised, "shifts" (B, 2) in shift_scale units}``."""

    def __init__(self, cfg: PoseNetConfig, amp_mean=None, amp_std=None, shift_scale: float = 1.0):
        super().__init__()
        self.cfg = cfg
        self.grid = SO3Grid(cfg.n_directions, cfg.n_inplane)
        self.features, n = backbone_for(cfg)
        self.pose = head(n, cfg.hidden, len(self.grid))
        self.amp = head(n, cfg.hidden, cfg.n_amplitudes)
        self.shift = head(n, cfg.hidden, 2)
        M = cfg.n_amplitudes
        self.register_buffer("amp_mean", torch.as_tensor(np.zeros(M) if amp_mean is None else amp_mean, dtype=torch.float32))
        self.register_buffer("amp_std", torch.as_tensor(np.ones(M) if amp_std is None else amp_std, dtype=torch.float32))
        self.register_buffer("shift_scale", torch.tensor(float(shift_scale)))

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Downsample (B, 1, d, d) to the input box."""
        d, b = x.shape[-1], self.cfg.input_box
        if d == b:
            return x
        if self.cfg.downsample == "avg" and d % b == 0:
            return F.avg_pool2d(x, d // b)
        X = torch.fft.rfft2(x)
        h = b // 2
        X = torch.cat([X[..., :h, :h + 1], X[..., d - h:, :h + 1]], dim=-2)
        return torch.fft.irfft2(X, s=(b, b)) * (b * b / (d * d))

    def _apply(self, fn, *args, **kwargs):
        """Module.to/cuda/cpu also move the grid (plain tensors, not buffers: not checkpointed)."""
        out = super()._apply(fn, *args, **kwargs)
        self.grid.to(self.amp_mean.device)
        return out

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(self.prepare(x))
        return {"pose_logits": self.pose(f), "amplitudes": self.amp(f), "shifts": self.shift(f)}

    def encode_targets(self, amplitudes: torch.Tensor, origins: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (amplitudes - self.amp_mean) / self.amp_std, origins / self.shift_scale

    def turned_outputs(self, x: torch.Tensor, turns: int = 4) -> dict[str, torch.Tensor]:
        """Test-time augmentation by exact quarter turns: outputs averaged over the image
        turned by 0, 90, 180, 270° (``turns`` of them), each mapped back to the original frame.
        A quarter turn about the centre pixel (d//2) — ``torch.rot90`` then a one-pixel roll
        along y — is psi + 90°: a cyclic shift of the grid's in-plane index by n_inplane/4;
        it maps the origin (ox, oy) to (oy, −ox); amplitudes are unchanged. Returns
        ``{"log_probs" (B, n_grid), "amplitudes", "shifts"}`` (standardised units)."""
        nd, ni = self.cfg.n_directions, self.cfg.n_inplane
        if turns > 1 and ni % 4:
            raise ValueError("quarter-turn averaging needs n_inplane divisible by 4")
        acc = {"log_probs": 0.0, "amplitudes": 0.0, "shifts": 0.0}
        xt = x
        for t in range(max(turns, 1)):
            if t:
                xt = torch.roll(torch.rot90(xt, 1, (-2, -1)), 1, -2)
            out = self(xt)
            lp = torch.log_softmax(out["pose_logits"].float(), 1).reshape(-1, nd, ni)
            acc["log_probs"] = acc["log_probs"] + torch.roll(lp, -t * ni // 4, -1).reshape(len(x), -1)
            acc["amplitudes"] = acc["amplitudes"] + out["amplitudes"]
            sh = out["shifts"]
            for _ in range(t):  # undo the turns: (o'x, o'y) → (−o'y, o'x)
                sh = torch.stack([-sh[:, 1], sh[:, 0]], 1)
            acc["shifts"] = acc["shifts"] + sh
        return {k: v / max(turns, 1) for k, v in acc.items()}

    @torch.no_grad()
    def answers(self, x: torch.Tensor, turns: int = 1) -> dict[str, torch.Tensor]:
        """The network's raw answer in physical units: ``logits`` (B, n_grid) of the pose
        distribution (log-probabilities averaged over ``turns`` quarter turns when > 1,
        :meth:`turned_outputs`), ``amplitudes`` (B, M), ``origins`` (B, 2) Å, ``confidence``
        (the distribution's largest probability)."""
        if turns > 1:
            out = self.turned_outputs(x, turns)
            logits = out["log_probs"]
        else:
            out = self(x)
            logits = out["pose_logits"]
        return {"logits": logits, "amplitudes": out["amplitudes"] * self.amp_std + self.amp_mean,
                "origins": out["shifts"] * self.shift_scale,
                "confidence": torch.softmax(logits.float(), 1).max(1).values}

    @torch.no_grad()
    def predict(self, x: torch.Tensor, decode: str = "local", k: int | None = None, turns: int = 1) -> dict[str, torch.Tensor]:
        """Physical answers: rotations (B,3,3) decoded from the distribution, amplitudes (B,M),
        origins (B,2) Å and the confidence (:meth:`answers`)."""
        a = self.answers(x, turns)
        return {"rotations": self.grid.decode(a["logits"], decode, k), "amplitudes": a["amplitudes"],
                "origins": a["origins"], "confidence": a["confidence"]}


def loss_terms(net: PoseNet, out: dict, batch: dict, sigma_deg: float, smoothing: float = 0.0) -> dict[str, torch.Tensor]:
    """Pose cross-entropy, amplitude and shift smooth-L1 (standardised units)."""
    qa, so = net.encode_targets(batch["amplitudes"], batch["origins"])
    return {"pose": net.grid.loss(out["pose_logits"], batch["rotations"], sigma_deg, smoothing),
            "amplitudes": F.smooth_l1_loss(out["amplitudes"], qa),
            "shifts": F.smooth_l1_loss(out["shifts"], so)}
