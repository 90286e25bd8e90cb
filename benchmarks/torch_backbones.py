"""PyTorch peers of tljax's ResNet and ViT backbones, for benchmarks/backbone_speed.py.

The networks are written here because torchvision and timm are not dependencies; their module
names are those of the reference implementations, so ``state_dict()`` is a checkpoint that
tljax's converters (``tljax.models.converters``) read, and the benchmark checks that both
frameworks compute the same logits from the same weights before it times them.

* ResNet-18/34/50: He et al., "Deep Residual Learning for Image Recognition", CVPR 2016
  (arXiv:1512.03385), as pytorch/vision ``torchvision/models/resnet.py`` builds it (ResNet v1.5:
  the Bottleneck strides on its 3x3 convolution). BatchNorm is frozen: it stays in eval mode
  under ``model.train()``, so it normalises with its running statistics and only its weight and
  bias train, which is what tljax's ``norm='affine'`` computes (statistics folded into
  ``scale`` and ``bias`` by ``tljax.models.torch_convert``).
* ViT-S/16 and ViT-B/16: Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021
  (arXiv:2010.11929), as huggingface/pytorch-image-models builds ``vit_small_patch16_224`` /
  ``vit_base_patch16_224`` (``timm/models/vision_transformer.py``: ``VisionTransformer`` with
  a class token and ``global_pool='token'``, ``Block``, ``Mlp``; ``timm/layers/attention.py``:
  ``Attention`` with its fused ``qkv`` and, timm's default, ``F.scaled_dot_product_attention``).

The training step is the one a PyTorch user writes: eager mode, uint8 images converted to float
in the step (as tljax's step does), cross-entropy, ``torch.optim.SGD`` with momentum 0.9, and
``torch.set_num_threads`` set by the caller. ResNets run channels-last, the layout PyTorch
recommends for oneDNN's CPU convolutions (tljax's convolutions are NHWC too); the ViT's
activations are token matrices, for which the layout does not apply.
torch.compile is not used: eager is the common way to train, and inductor's CPU compile of these
networks takes minutes on a small machine.

  import torch_backbones
  model = torch_backbones.build("resnet50", num_classes=10, image_size=224)
  optimizer = torch_backbones.make_optimizer(model)
  ms, per_step = torch_backbones.time_steps(model, optimizer, images_u8, labels, steps=5)
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# model name -> (block, blocks per stage), torchvision's resnet18/34/50.
RESNET_LAYERS = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
}
# timm's vit_small_patch16_224 / vit_base_patch16_224 (the sizes of tljax.models.vit.VIT_SPECS).
VIT_SPECS = {
    "vit_s16": dict(width=384, depth=12, heads=6, mlp_dim=1536, patch=16),
    "vit_b16": dict(width=768, depth=12, heads=12, mlp_dim=3072, patch=16),
}
MODELS = (*RESNET_LAYERS, *VIT_SPECS)
LEARNING_RATE = 0.01  # configs/pretrain.py's lr.base; the value does not change the step's cost.
MOMENTUM = 0.9


# ----------------------------------------------------------------------------------------------
# ResNet (torchvision names).


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: two 3x3 convolutions and the shortcut.

    Args:
        inplanes: input channels.
        planes: channels of both convolutions.
        stride: stride of the first convolution.
        downsample: the shortcut projection, or None for the identity.
    """

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample=None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output, ``relu(branch(x) + shortcut(x))``."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck (v1.5: the 3x3 convolution strides).

    Args:
        inplanes: input channels.
        planes: bottleneck channels (the output has ``4 * planes``).
        stride: stride of the 3x3 convolution.
        downsample: the shortcut projection, or None for the identity.
    """

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample=None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output, ``relu(branch(x) + shortcut(x))``."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision's ResNet with frozen BatchNorm (eval mode whatever ``train()`` says).

    Args:
        block: ``BasicBlock`` or ``Bottleneck``.
        stage_sizes: blocks in each of the four stages.
        num_classes: outputs of ``fc``.
    """

    def __init__(self, block, stage_sizes: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        self.block = block
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(64, stage_sizes[0], 1)
        self.layer2 = self._make_layer(128, stage_sizes[1], 2)
        self.layer3 = self._make_layer(256, stage_sizes[2], 2)
        self.layer4 = self._make_layer(512, stage_sizes[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        for module in self.modules():  # torchvision's initialisation.
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        out_planes = planes * self.block.expansion
        downsample = None
        if stride != 1 or self.inplanes != out_planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, out_planes, 1, stride, bias=False),
                nn.BatchNorm2d(out_planes),
            )
        layers = [self.block(self.inplanes, planes, stride, downsample)]
        self.inplanes = out_planes
        layers += [self.block(out_planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def train(self, mode: bool = True) -> ResNet:
        """Sets training mode but keeps every BatchNorm in eval mode (frozen statistics).

        Args:
            mode: training (True) or evaluation (False) mode for the other modules.

        Returns:
            ``self``.
        """
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits of NCHW images."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def calibrate_batch_norm(model: nn.Module, images: torch.Tensor) -> None:
    """Sets every BatchNorm's running statistics to those of ``images`` (then freezes them).

    With random weights the default statistics (mean 0, variance 1) normalise nothing and the
    activations grow block after block; statistics measured on a batch make the frozen network
    behave like a pretrained one (unit-scale activations), and non-trivial statistics exercise
    the converter's folding of every one of them.

    Args:
        model: a network whose BatchNorm layers are calibrated in place.
        images: NCHW float input batch.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # A cumulative average: one batch gives its exact statistics.
        norm.train()
    with torch.no_grad():
        model(images)
    for norm in norms:
        norm.momentum = 0.1
        norm.eval()


def _randomize_batch_norm_affine(model: nn.Module, generator: torch.Generator) -> None:
    """Random BatchNorm weights and biases, so the check covers them (torchvision: 1 and 0)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.normal_(0.0, 0.2, generator=generator)


def resnet(name: str, num_classes: int, image_size: int, seed: int = 0) -> ResNet:
    """A torchvision ResNet with random weights and calibrated, frozen BatchNorm.

    Args:
        name: a key of ``RESNET_LAYERS``.
        num_classes: outputs of ``fc``.
        image_size: side of the random images the BatchNorm statistics are measured on.
        seed: seed of the weights and of those images.

    Returns:
        The model in training mode (BatchNorm in eval mode), NCHW (contiguous) format.
    """
    block, stage_sizes = RESNET_LAYERS[name]
    torch.manual_seed(seed)
    model = ResNet({"basic": BasicBlock, "bottleneck": Bottleneck}[block], stage_sizes, num_classes)
    generator = torch.Generator().manual_seed(seed)
    _randomize_batch_norm_affine(model, generator)
    calibrate_batch_norm(model, torch.rand(8, 3, image_size, image_size, generator=generator))
    return model.train()


# ----------------------------------------------------------------------------------------------
# ViT (timm names).


class PatchEmbed(nn.Module):
    """timm's PatchEmbed: a P x P / P convolution, flattened to tokens.

    Args:
        width: token width D.
        patch: patch side P.
    """

    def __init__(self, width: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, width, patch, patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, H * W / P**2, D) patch tokens of NCHW images."""
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """timm's Attention: fused qkv projection, scaled dot-product attention, proj.

    Args:
        width: token width D.
        heads: attention heads (a divisor of D).
    """

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.num_heads = heads
        self.head_dim = width // heads
        self.qkv = nn.Linear(width, width * 3)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Self-attention of (N, L, D) tokens."""
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)  # timm's fused_attn path (its default).
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    """timm's Mlp: fc1, exact GELU, fc2.

    Args:
        width: token width D.
        hidden: fc1's width.
    """

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP of (N, L, D) tokens."""
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """timm's pre-LN Block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``.

    Args:
        width: token width D.
        heads: attention heads.
        mlp_dim: hidden width of the MLP.
    """

    def __init__(self, width: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = Mlp(width, mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block applied to (N, L, D) tokens."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """timm's VisionTransformer with a class token, 'token' pooling and no fc_norm.

    Args:
        width: token width D.
        depth: number of blocks.
        heads: attention heads.
        mlp_dim: hidden width of the MLPs.
        patch: patch side P.
        image_size: input side (a multiple of P); one position embedding per patch of it.
        num_classes: outputs of ``head``.
    """

    def __init__(
        self,
        width: int,
        depth: int,
        heads: int,
        mlp_dim: int,
        patch: int,
        image_size: int,
        num_classes: int,
    ) -> None:
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size={image_size} is not a multiple of patch={patch}.")
        num_patches = (image_size // patch) ** 2
        self.patch_embed = PatchEmbed(width, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_patches, width))
        self.blocks = nn.Sequential(*[Block(width, heads, mlp_dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits of NCHW images."""
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.norm(self.blocks(x + self.pos_embed))
        return self.head(x[:, 0])


def vit(name: str, num_classes: int, image_size: int, seed: int = 0) -> VisionTransformer:
    """A timm ViT with random weights of unit-scale signal.

    Every parameter is random, LayerNorm scales and biases, class token and position embeddings
    included, so the logit check covers each of them; matrices are LeCun-normal, which keeps the
    logits of order one (timm's std-0.02 initialisation gives logits too small to compare).

    Args:
        name: a key of ``VIT_SPECS``.
        num_classes: outputs of ``head``.
        image_size: input side.
        seed: seed of the weights.

    Returns:
        The model in training mode.
    """
    torch.manual_seed(seed)
    model = VisionTransformer(**VIT_SPECS[name], image_size=image_size, num_classes=num_classes)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "norm" in param_name and param_name.endswith("weight"):
                param.uniform_(0.5, 1.5)
            elif param.ndim >= 2 and param_name not in ("cls_token", "pos_embed"):
                param.normal_(0.0, param[0].numel() ** -0.5)
            else:
                param.normal_(0.0, 0.2)
    return model.train()


# ----------------------------------------------------------------------------------------------
# Building, the train step and its timing.


def build(name: str, num_classes: int, image_size: int, seed: int = 0) -> nn.Module:
    """The PyTorch peer of tljax's ``model.name=name``, ready to train.

    Args:
        name: one of ``MODELS``.
        num_classes: outputs of the head.
        image_size: input side (square images).
        seed: seed of the random weights.

    Returns:
        The model in training mode; ResNets in channels-last format.

    Raises:
        ValueError: an unknown name.
    """
    if name in RESNET_LAYERS:
        return resnet(name, num_classes, image_size, seed).to(memory_format=torch.channels_last)
    if name in VIT_SPECS:
        return vit(name, num_classes, image_size, seed)
    raise ValueError(f"No PyTorch peer for model {name!r}; use one of {list(MODELS)}.")


def to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC images as the network's float NCHW input in [0, 1].

    Args:
        images: uint8 (N, H, W, 3).

    Returns:
        float32 (N, 3, H, W), channels-last strided: permuting NHWC to NCHW is already a
        channels-last view, so the one copy is the dtype conversion.
    """
    x = images.permute(0, 3, 1, 2)
    out = torch.empty(x.shape, dtype=torch.float32, memory_format=torch.channels_last)
    return out.copy_(x).mul_(1.0 / 255.0)


def make_optimizer(model: nn.Module, lr: float = LEARNING_RATE) -> torch.optim.SGD:
    """SGD with momentum 0.9 over every parameter (configs/pretrain.py's optimizer).

    Args:
        model: the network.
        lr: learning rate.

    Returns:
        The optimizer.
    """
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM)


def train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """One fine-tuning step: input conversion, forward, cross-entropy, backward, SGD update.

    Args:
        model: the network, in training mode.
        optimizer: its optimizer.
        images: uint8 (N, H, W, 3).
        labels: int64 (N,).

    Returns:
        The loss (detached).
    """
    loss = F.cross_entropy(model(to_input(images)), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def time_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: np.ndarray,
    labels: np.ndarray,
    steps: int,
    warmup: int = 1,
) -> tuple[float, list[float]]:
    """Median wall time of single train steps on one fixed batch.

    Args:
        model: the network, in training mode.
        optimizer: its optimizer.
        images: uint8 (N, H, W, 3) batch.
        labels: int (N,) labels.
        steps: timed steps (at least 1).
        warmup: untimed steps first (oneDNN primitive creation, allocator warm-up).

    Returns:
        (median ms per step, every timed step's ms).

    Raises:
        ValueError: ``steps`` < 1.
    """
    if steps < 1:
        raise ValueError(f"steps={steps}: time at least one step.")
    # Copies: the arrays may be read-only views of device buffers, which torch will not wrap.
    images_t = torch.from_numpy(np.array(images, np.uint8))
    labels_t = torch.from_numpy(np.array(labels, np.int64))
    for _ in range(warmup):
        train_step(model, optimizer, images_t, labels_t)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        train_step(model, optimizer, images_t, labels_t)  # Eager CPU ops are synchronous.
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), times


def logits(model: nn.Module, images: np.ndarray) -> np.ndarray:
    """The model's logits of float NHWC images, without gradients.

    Args:
        model: the network (BatchNorm frozen, no dropout: training and eval modes agree).
        images: float32 (N, H, W, 3).

    Returns:
        (N, num_classes) float32 logits.
    """
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    with torch.no_grad():
        return model(x.contiguous(memory_format=torch.channels_last)).numpy()


def num_params(model: nn.Module) -> int:
    """The number of trainable parameters (BatchNorm statistics are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
