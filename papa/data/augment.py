"""Per-member data augmentation and regularization, applied to whole batches on the images' device. Every random
decision is made per sample (torchvision's transforms draw one per batch tensor), except mixup/cutmix, which draw
one lambda per batch as timm's Mixup does. All random numbers come from a CPU ``torch.Generator`` and are moved to
the images' device, so a run draws the same numbers on CPU and GPU."""

import dataclasses
import itertools
import math
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from papa.errors import PapaError
from papa.rng import seeded_globals

# timm RandAugment config strings: magnitude, layers, probability, magnitude std/max, increasing, weights
RANDAUGMENT = re.compile(r"rand(-(mstd|mmax|inc|m|n|p|w)\d+(\.\d+)?)*")
# the authors' box (timm's RandomErasing in their utils/random_erasing.py: area 2% to 1/3 of the image, aspect
# 0.3 to 1 / 0.3, 10 attempts), a little wider than torchvision's defaults (0.33, 3.3)
ERASE_SCALE, ERASE_RATIO, ERASE_ATTEMPTS = (0.02, 1 / 3), (0.3, 1 / 0.3), 10


@dataclass
class Policy:
    """One member's augmentations and regularizations (0 / False / '' = off). mixup, cutmix: Beta(a, a) parameters (the
    paper's alpha for Mixup, lambda for CutMix; with both, see mix). random_erasing: probability per sample.
    crop_padding: random crop after zero padding (CIFAR: 4). cutout: side of one square hole per sample (DeVries &
    Taylor). autoaugment: torchvision AutoAugment policy name. randaugment: a timm RandAugment config string (Wightman
    et al.), e.g. 'rand-m4-n1-mstd1.0-p1.0' (one operation per image, magnitude 4 of 10 with std 1, always applied)."""
    mixup: float = 0.0
    label_smoothing: float = 0.0
    cutmix: float = 0.0
    random_erasing: float = 0.0
    crop_padding: int = 0
    flip: bool = False
    cutout: int = 0
    autoaugment: str = ""
    randaugment: str = ""

    def __post_init__(self):
        for name in ("mixup", "cutmix", "label_smoothing", "random_erasing"):
            setattr(self, name, float(getattr(self, name)))
        if self.mixup < 0 or self.cutmix < 0:
            raise PapaError(f"mixup and cutmix must be >= 0, found {self.mixup} and {self.cutmix}")
        if not 0 <= self.label_smoothing < 1 or not 0 <= self.random_erasing <= 1:
            raise PapaError(f"label_smoothing must be in [0, 1) and random_erasing in [0, 1], found "
                            f"{self.label_smoothing} and {self.random_erasing}")
        if int(self.crop_padding) != self.crop_padding or self.crop_padding < 0 or self.cutout < 0:
            raise PapaError(f"crop_padding and cutout must be integers >= 0, found {self.crop_padding} and "
                            f"{self.cutout}")
        self.crop_padding, self.cutout, self.flip = int(self.crop_padding), int(self.cutout), bool(self.flip)
        if isinstance(self.autoaugment, bool) or self.autoaugment is None:  # a config's on/off switch
            self.autoaugment = "cifar10" if self.autoaugment else ""
        if self.autoaugment:
            autoaugment_policy(self.autoaugment)
        self.randaugment = self.randaugment or ""
        if self.randaugment:
            randaugment_transform(self.randaugment, 32, (0.5, 0.5, 0.5))

    def base(self) -> "Policy":
        """The plain transform every member shares (crop, flip) without any regularization."""
        return Policy(crop_padding=self.crop_padding, flip=self.flip)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


POLICY_FIELDS = tuple(f.name for f in dataclasses.fields(Policy))


def _uniform(key: str, spec: dict, generator: torch.Generator) -> float:
    bounds = spec.get("uniform")
    if set(spec) != {"uniform"} or not isinstance(bounds, list | tuple) or len(bounds) != 2:
        raise PapaError(f"augmentation grid {key!r}: expected a list of values or {{'uniform': [lo, hi]}}")
    lo, hi = float(bounds[0]), float(bounds[1])
    return lo + (hi - lo) * torch.rand((), generator=generator, dtype=torch.float64).item()


def draw_policies(grid: dict, p: int, generator: torch.Generator, base: dict | None = None) -> list[Policy]:
    """Each member's policy: ``base`` (fixed settings, e.g. crop and flip) plus its regularization from the grid.
    The combinations of the listed values are shuffled and dealt out, member i taking combination i modulo their
    number, as the authors' main.py does; keys given as {"uniform": [lo, hi]} are then drawn member after member."""
    if unknown := [key for key in [*grid, *(base or {})] if key not in POLICY_FIELDS]:
        raise PapaError(f"unknown augmentation {unknown[0]!r}; expected one of {', '.join(POLICY_FIELDS)}")
    listed = [key for key in sorted(grid) if not isinstance(grid[key], dict)]
    for key in listed:
        if not isinstance(grid[key], list | tuple) or not grid[key]:
            raise PapaError(f"augmentation grid {key!r}: expected a non-empty list of values, found {grid[key]!r}")
    combos = list(itertools.product(*(grid[key] for key in listed)))
    order = torch.randperm(len(combos), generator=generator).tolist()
    uniform = [key for key in sorted(grid) if key not in listed]
    return [Policy(**(dict(base or {}) | dict(zip(listed, combos[order[i % len(combos)]], strict=True))
                      | {key: _uniform(key, grid[key], generator) for key in uniform})) for i in range(p)]


def autoaugment_policy(name: str):
    from torchvision.transforms import AutoAugmentPolicy
    policies = {name: getattr(AutoAugmentPolicy, name.upper()) for name in ("cifar10", "imagenet", "svhn")}
    if name not in policies:
        raise PapaError(f"unknown AutoAugment policy {name!r}; expected one of {', '.join(policies)}")
    return policies[name]


def randaugment_transform(config: str, image_size: int, mean):
    """timm's RandAugment on PIL images, with timm's hyperparameters for ``image_size`` and fill colour ``mean``."""
    from timm.data.auto_augment import rand_augment_transform
    # timm skips parts it cannot parse, so a typo would silently mean the defaults
    if not isinstance(config, str) or not RANDAUGMENT.fullmatch(config):
        raise PapaError(f"randaugment: expected a timm config string such as 'rand-m4-n1-mstd1.0-p1.0' "
                        f"(parts m, n, p, mstd, mmax, inc, w with numbers), found {config!r}")
    fill = tuple(min(255, round(255 * m)) for m in mean)
    try:
        return rand_augment_transform(config, {"translate_const": int(image_size * 0.45), "img_mean": fill})
    except Exception as err:  # timm asserts and raises assorted errors on a malformed string
        raise PapaError(f"randaugment: invalid timm config string {config!r} ({type(err).__name__}: {err})") \
            from None


# random numbers ---------------------------------------------------------------------------------------------
def to_device(t: Tensor, device) -> Tensor:
    """A tensor drawn on the host, on ``device``: to a GPU through pinned memory without blocking (a plain copy
    would wait for all queued GPU work at every draw; torch's pinned-memory cache keeps the buffer alive)."""
    device = torch.device(device)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def _rand(generator: torch.Generator, *shape: int, device) -> Tensor:
    return to_device(torch.rand(shape, generator=generator), device)


def draw_seed(generator: torch.Generator) -> int:
    """A 62-bit seed drawn from ``generator``: the one seed of a generator or RNG made for one batch's draws."""
    return int(torch.randint(2**62, (), generator=generator))


def _beta(alpha: float, generator: torch.Generator) -> float:
    # torch's Beta cannot take a generator; a numpy stream seeded from ours keeps every draw reproducible
    return float(np.random.default_rng(draw_seed(generator)).beta(alpha, alpha))


# per-sample geometric transforms on uint8 ---------------------------------------------------------------
def random_crop(images: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """Zero-pad by ``padding`` and crop back to the original size at a random offset per sample."""
    (b, _, h, w), dev = images.shape, images.device
    offsets = to_device(torch.randint(2 * padding + 1, (2, b), generator=generator), dev)
    padded = F.pad(images, (padding,) * 4).permute(0, 2, 3, 1)  # (B, H', W', C) so indexing keeps C last
    rows = (offsets[0, :, None] + torch.arange(h, device=dev))[:, :, None]
    cols = (offsets[1, :, None] + torch.arange(w, device=dev))[:, None, :]
    return padded[torch.arange(b, device=dev)[:, None, None], rows, cols].permute(0, 3, 1, 2).contiguous()


def random_flip(images: Tensor, generator: torch.Generator) -> Tensor:
    """Flip each sample horizontally with probability 1/2."""
    flip = _rand(generator, images.shape[0], device=images.device) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(3), images)


def autoaugment(images: Tensor, policy: str, generator: torch.Generator) -> Tensor:
    """torchvision's AutoAugment, one call per sample on the CPU (under the global RNG seeded from ``generator``)."""
    from torchvision.transforms import v2
    augment = v2.AutoAugment(autoaugment_policy(policy))
    with seeded_globals(draw_seed(generator)):
        return torch.stack([augment(image) for image in images.cpu()]).to(images.device)


def randaugment(images: Tensor, config: str, generator: torch.Generator, mean=(0.5, 0.5, 0.5)) -> Tensor:
    """timm's RandAugment (see Policy), one call per sample on the CPU under global RNGs seeded from ``generator``."""
    from PIL import Image
    augment = randaugment_transform(config, images.shape[-1], mean)
    channels_last = images.cpu().permute(0, 2, 3, 1).numpy()
    gray = images.shape[1] == 1
    with seeded_globals(draw_seed(generator)):
        out = [np.asarray(augment(Image.fromarray(a[..., 0] if gray else a))) for a in channels_last]
    out = torch.from_numpy(np.stack(out))
    return (out[:, None] if gray else out.permute(0, 3, 1, 2)).contiguous().to(images.device)


def geometric(policy: Policy, images: Tensor, generator: torch.Generator, mean=(0.5, 0.5, 0.5)) -> Tensor:
    """The per-sample uint8 transforms of a policy: crop, flip, AutoAugment, RandAugment (filling with ``mean``)."""
    if policy.crop_padding:
        images = random_crop(images, policy.crop_padding, generator)
    if policy.flip:
        images = random_flip(images, generator)
    if policy.autoaugment:
        images = autoaugment(images, policy.autoaugment, generator)
    if policy.randaugment:
        images = randaugment(images, policy.randaugment, generator, mean)
    return images


# normalized float transforms ------------------------------------------------------------------------------
@lru_cache(maxsize=32)
def _affine(mean: tuple, std: tuple, device: torch.device) -> tuple[Tensor, Tensor]:
    std_t = torch.tensor(std, dtype=torch.float32)
    scale = (1.0 / (255.0 * std_t)).view(1, -1, 1, 1)
    shift = (-torch.tensor(mean, dtype=torch.float32) / std_t).view(1, -1, 1, 1)
    return scale.to(device), shift.to(device)


RESIZE_MODES = ("bilinear", "bicubic")


def eval_transform(images: Tensor, mean, std, size: int | None = None, mode: str = "bilinear",
                   pixels: bool = False) -> Tensor:
    """uint8 (B, C, H, W) -> float32 normalized with per-channel mean/std (in [0, 1] pixel units), resized to ``size``
    when given (antialiased, as timm's eval resize; the authors' fine-tuning resized CIFAR to 224 bicubic). ``pixels``:
    resized as PIL resizes a uint8 image (the scripts' T.Resize before ToTensor, fidelity.finetune_resize): a
    horizontal then a vertical pass, each rounded to whole levels and clipped to 0-255, then normalized."""
    if mode not in RESIZE_MODES:
        raise PapaError(f"resize mode must be one of {', '.join(RESIZE_MODES)}, got {mode!r}")
    scale, shift = _affine(tuple(mean), tuple(std), images.device)
    resize = size is not None and tuple(images.shape[-2:]) != (size, size)
    if resize and pixels:
        x = images.float()
        for shape in ((x.shape[-2], size), (size, size)):
            x = F.interpolate(x, size=shape, mode=mode, align_corners=False, antialias=True).clamp(0, 255).round()
        return x * scale + shift
    x = images.float() * scale + shift
    # interpolation weights sum to 1, so resizing after the per-channel affine map equals resizing before it
    if resize:
        x = F.interpolate(x, size=(size, size), mode=mode, align_corners=False, antialias=True)
    return x


def _box_mask(top: Tensor, left: Tensor, bottom: Tensor, right: Tensor, h: int, w: int) -> Tensor:
    """(B, 1, H, W) mask of the boxes [top, bottom) x [left, right) (one per sample)."""
    r, c = torch.arange(h, device=top.device)[None, :, None], torch.arange(w, device=top.device)[None, None, :]
    inside = (r >= top[:, None, None]) & (r < bottom[:, None, None]) & (c >= left[:, None, None])
    return (inside & (c < right[:, None, None]))[:, None]


def cutout(x: Tensor, length: int, generator: torch.Generator) -> Tensor:
    """One length x length hole per sample, centred anywhere, of 0: the mean after normalization (DeVries & Taylor)."""
    b, _, h, w = x.shape
    centre = to_device(torch.stack([torch.randint(size, (b,), generator=generator) for size in (h, w)]), x.device)
    lo, hi = centre - length // 2, centre + length // 2  # the mask clips the box at the border
    return x.masked_fill(_box_mask(lo[0], lo[1], hi[0], hi[1], h, w), 0.0)


def random_erasing(x: Tensor, probability: float, generator: torch.Generator) -> Tensor:
    """RandomErasing (timm's and torchvision's draw, the box of ``ERASE_SCALE`` and ``ERASE_RATIO``; value 0, the mean
    after normalization), deciding per sample."""
    (b, _, h, w), dev = x.shape, x.device
    erase = _rand(generator, b, device=dev) < probability
    lo, hi = ERASE_SCALE
    area = h * w * (lo + (hi - lo) * _rand(generator, b, ERASE_ATTEMPTS, device=dev))
    log_lo, log_hi = math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * _rand(generator, b, ERASE_ATTEMPTS, device=dev))
    eh, ew = torch.sqrt(area * aspect).round().long(), torch.sqrt(area / aspect).round().long()
    fits = (eh < h) & (ew < w)
    attempt = fits.int().argmax(1)[:, None]  # first attempt that fits, as torchvision's loop takes
    erase &= fits.any(1)
    eh, ew = eh.gather(1, attempt).squeeze(1), ew.gather(1, attempt).squeeze(1)
    top = (_rand(generator, b, device=dev) * (h - eh + 1)).floor().long()
    left = (_rand(generator, b, device=dev) * (w - ew + 1)).floor().long()
    mask = _box_mask(top, left, top + eh, left + ew, h, w) & erase[:, None, None, None]
    return x.masked_fill(mask, 0.0)


def _cutmix_box(lam: float, h: int, w: int, generator: torch.Generator) -> tuple[int, int, int, int]:
    # a box of area ~(1 - lam) centred anywhere and clipped, as in Yun et al. and timm
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(h * ratio), int(w * ratio)
    cy, cx = int(torch.randint(h, (), generator=generator)), int(torch.randint(w, (), generator=generator))
    return max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h), max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)


def one_hot(labels: Tensor, num_classes: int) -> Tensor:
    """Labels (B,) -> (B, K), or per-pixel labels (B, H, W) -> (B, K, H, W), float32."""
    targets = F.one_hot(labels, num_classes).float()
    return targets if labels.dim() == 1 else targets.movedim(-1, 1).contiguous()


def mix(policy: Policy, x: Tensor, labels: Tensor, num_classes: int, generator: torch.Generator):
    """Mixup or CutMix of sample i with sample B - 1 - i (the batch reversed: timm's Mixup in batch mode, the
    authors' utils/mixup.py; batches come in random order), then label smoothing -> (x, soft targets (B, K)), or
    (B, K, H, W) for per-pixel labels (B, H, W), where CutMix pastes the partner's labels with its box."""
    targets = one_hot(labels, num_classes)
    if policy.mixup > 0 or policy.cutmix > 0:
        both = policy.mixup > 0 and policy.cutmix > 0  # then one of the two per batch, as timm's switch_prob=0.5
        use_cutmix = torch.rand((), generator=generator).item() < 0.5 if both else policy.cutmix > 0
        lam = _beta(policy.cutmix if use_cutmix else policy.mixup, generator)
        if use_cutmix:
            top, bottom, left, right = _cutmix_box(lam, x.shape[2], x.shape[3], generator)
            x = x.clone()
            x[:, :, top:bottom, left:right] = x.flip(0)[:, :, top:bottom, left:right]
            lam = 1.0 - (bottom - top) * (right - left) / (x.shape[2] * x.shape[3])  # the box actually cut
        else:
            x = lam * x + (1.0 - lam) * x.flip(0)
        if use_cutmix and labels.dim() == 3:
            targets = targets.clone()
            targets[:, :, top:bottom, left:right] = targets.flip(0)[:, :, top:bottom, left:right]
        else:
            targets = lam * targets + (1.0 - lam) * targets.flip(0)
    if policy.label_smoothing > 0:
        targets = targets * (1.0 - policy.label_smoothing) + policy.label_smoothing / num_classes
    return x, targets


def regularize(policy: Policy, images: Tensor, labels: Tensor, num_classes: int, mean, std,
               generator: torch.Generator, size: int | None = None, mode: str = "bilinear",
               pixels: bool = False) -> tuple[Tensor, Tensor]:
    """Everything after the geometric transforms: normalize and resize to ``size`` (the model's input, with
    ``mode`` and ``pixels``: ``eval_transform``), then cutout, erasing, mixup/cutmix (at the model's resolution),
    smoothing."""
    x = eval_transform(images, mean, std, size, mode, pixels)
    if policy.cutout:
        x = cutout(x, policy.cutout, generator)
    if policy.random_erasing:
        x = random_erasing(x, policy.random_erasing, generator)
    return mix(policy, x, labels, num_classes, generator)


@torch.no_grad()
def apply(policy: Policy, images: Tensor, labels: Tensor, num_classes: int, mean, std,
          generator: torch.Generator, size: int | None = None, mode: str = "bilinear",
          pixels: bool = False) -> tuple[Tensor, Tensor]:
    """A member's training batch: uint8 (B, C, H, W) and labels (B,) -> normalized float32 (B, C, S, S) and soft
    targets (B, K); the uint8 transforms run at the stored resolution, the rest at the model's (S = ``size``)."""
    images = geometric(policy, images, generator, mean)
    return regularize(policy, images, labels, num_classes, mean, std, generator, size, mode, pixels)
