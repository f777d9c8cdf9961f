"""A planted effect: InceptionV1 (random weights) whose mixed4b 5x5 branch also fires on red discs."""

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

RED = (225, 20, 25)


def red_mask(model_input: torch.Tensor) -> torch.Tensor:
    """[B, 1, H, W] 1.0 where a pixel is disc-red (model input scale: x * 255 - 117)."""
    rgb = (model_input + 117.0) / 255.0
    r, g, b = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    return ((r > 0.7) & (g < 0.3) & (b < 0.3)).float()[:, None]


def plant_red_disc_signal(model, layer: str = "mixed4b", branch_module: str = "5x5", strength: float = 300.0,
                          seed: int = 0):
    """Add ``strength * (red share of each grid cell) * u`` to the branch's output, u a fixed unit
    direction over that branch's channels. Returns (model, u)."""
    module = getattr(model, f"{layer}_{branch_module}")
    channels = getattr(model, f"{layer}_{branch_module}_pre_relu_conv").out_channels
    u = torch.tensor(np.abs(np.random.default_rng(seed).standard_normal(channels)), dtype=torch.float32)
    u /= u.norm()
    state = {}
    model.register_forward_pre_hook(lambda m, args: state.__setitem__("x", args[0]))

    def add_signal(m, inputs, output):
        share = F.adaptive_avg_pool2d(red_mask(state["x"]), output.shape[2:])
        return output + strength * share * u.to(output)[None, :, None, None]

    module.register_forward_hook(add_signal)
    model.weights_id = f"random(seed=0)+planted(red discs -> {layer} {branch_module})"
    return model, u


def red_disc_images(folder: Path, n: int, seed: int = 0) -> list[tuple[Path, tuple | None]]:
    """n images (256x256): smooth blue-green fields; every other one has a red disc.
    Returns (path, (cx, cy, r) in 224-crop pixels, or None)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        coarse = rng.integers(0, 160, (6, 6, 3)).astype(np.uint8)
        coarse[..., 0] //= 3  # little red in the background
        img = Image.fromarray(coarse).resize((256, 256), Image.BICUBIC)
        disc = None
        if i % 2 == 0:
            r = int(rng.integers(30, 50))
            cx, cy = (int(v) for v in rng.integers(16 + r, 240 - r, 2))
            ImageDraw.Draw(img).ellipse([cx - r, cy - r, cx + r, cy + r], fill=RED)
            disc = (cx - 16, cy - 16, r)  # Resize(256) is the identity here; CenterCrop(224) shifts by 16
        path = folder / f"img_{i:03d}.png"
        img.save(path)
        out.append((path, disc))
    return out


def in_disc(disc, y: int, x: int, cell: int = 16) -> bool:
    """Whether grid cell (y, x) lies mostly inside the disc."""
    if disc is None:
        return False
    cx, cy, r = disc
    return (x * cell + cell / 2 - cx) ** 2 + (y * cell + cell / 2 - cy) ** 2 < (r - cell / 2) ** 2


def clear_of_disc(disc, y: int, x: int, cell: int = 16) -> bool:
    """Whether grid cell (y, x) holds no disc pixel at all."""
    if disc is None:
        return True
    cx, cy, r = disc
    return (x * cell + cell / 2 - cx) ** 2 + (y * cell + cell / 2 - cy) ** 2 > (r + cell * 0.75) ** 2
