"""Pictures made of pictures (PIL): the paper's figure 1 panels, rows of dataset-example crops, and
the random-weights stamp across a composite."""

from __future__ import annotations

import numpy as np

from helpers.config import BRANCHES
from helpers.show.style import BRANCH_COLOURS, NOT_A_RESULT


def figure1_image(panels: dict, layers, random_weights: bool, thumb: int = 96):
    """The paper's figure 1 for every branch as one PNG-ready PIL image, legible at page width: a row per layer
    and branch (the layer's name over its four rows), each the row's features side by side, a feature being its
    visualisation followed by its top dataset-example crops, under its label.

    panels: {(layer, branch): [(feature, featviz image or None, [crop arrays])]}.
    """
    from PIL import Image, ImageDraw

    from helpers.data.images import grid

    per_row = max((len(v) for v in panels.values()), default=1)
    crops_n = max((len(c) for v in panels.values() for _, _, c in v), default=0)
    entry_w, row_h, label_w, layer_h = (1 + crops_n) * (thumb + 4) + 12, thumb + 26, 66, 30
    canvas = Image.new("RGB", (label_w + per_row * entry_w + 4, len(layers) * (layer_h + len(BRANCHES) * row_h) + 4),
                       "white")
    draw = ImageDraw.Draw(canvas)
    y = 4
    for layer in layers:
        draw.text((6, y + 4), layer, fill="black", font=_font(20))
        y += layer_h
        for b in BRANCHES:
            draw.text((6, y + row_h // 2 - 8), b, fill=BRANCH_COLOURS[b], font=_font(17))
            for k, (feature, viz, crops) in enumerate(panels.get((layer, b), [])):
                x = label_w + k * entry_w
                draw.text((x, y), f"feature {feature}", fill="black", font=_font(14))
                tiles = [viz if viz is not None else np.full((thumb, thumb, 3), 230, np.uint8), *crops]
                canvas.paste(grid(tiles, thumb, len(tiles), gap=4, background=(230, 230, 230)), (x, y + 18))
            y += row_h
    if random_weights:
        stamp(canvas, NOT_A_RESULT)
    return canvas


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one small bitmap font
        return ImageFont.load_default()


def figure1_layer_image(title: str, entries: list[tuple[str, np.ndarray | None, list[np.ndarray]]],
                        random_weights: bool, thumb: int = 112, columns: int = 2):
    """The paper's figure 1 panel for one layer, legible at page width: ``entries`` (label, feature
    visualisation or None, top crops), ``columns`` to a row, each the visualisation then its crops,
    under a title; the random-weights watermark across it when ``random_weights``."""
    from PIL import Image, ImageDraw

    from helpers.data.images import grid

    crops_n = max((len(c) for _, _, c in entries), default=0)
    entry_w, entry_h = (1 + crops_n) * (thumb + 4) + 16, thumb + 30
    head = 34
    rows = -(-len(entries) // columns)
    canvas = Image.new("RGB", (columns * entry_w + 8, head + rows * entry_h + 6), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((8, 6), title, fill="black", font=_font(19))
    for k, (label, viz, crops) in enumerate(entries):
        x, y = 8 + (k % columns) * entry_w, head + (k // columns) * entry_h
        draw.text((x, y), label, fill="black", font=_font(15))
        tiles = [viz if viz is not None else np.full((thumb, thumb, 3), 230, np.uint8), *crops]
        canvas.paste(grid(tiles, thumb, len(tiles), gap=4, background=(230, 230, 230)), (x, y + 22))
    if random_weights:
        stamp(canvas, NOT_A_RESULT)
    return canvas


def stamp(canvas, text: str, alpha: int = 80) -> None:
    """Write ``text`` across ``canvas`` (a PIL RGB image) along its diagonal, red and translucent
    (``alpha`` of 255), so that it marks the whole figure and hides none of it."""
    import math

    from PIL import Image, ImageDraw

    angle = math.degrees(math.atan2(canvas.height, canvas.width))
    diagonal = math.hypot(canvas.width, canvas.height)
    size = 12  # the largest font whose text spans about 70% of the diagonal
    while size < 400 and _font(size + 4).getbbox(text)[2] <= 0.7 * diagonal:
        size += 4
    font = _font(size)
    box = font.getbbox(text)
    label = Image.new("RGBA", (box[2] - box[0] + 20, box[3] - box[1] + 20), (0, 0, 0, 0))
    ImageDraw.Draw(label).text((10 - box[0], 10 - box[1]), text, font=font, fill=(200, 0, 0, alpha))
    label = label.rotate(angle, expand=True, resample=Image.BICUBIC)
    x, y = (canvas.width - label.width) // 2, (canvas.height - label.height) // 2
    canvas.paste(label, (x, y), label)


def example_bands_image(rows: list[tuple[str, list[np.ndarray]]], size: int = 96):
    """Labelled rows of crops (e.g. one row per activation band) as one PIL image."""
    from PIL import Image, ImageDraw

    from helpers.data.images import grid

    width = 110 + max((len(c) for _, c in rows), default=1) * (size + 4)
    canvas = Image.new("RGB", (width, len(rows) * (size + 6) + 4), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (label, crops) in enumerate(rows):
        y = 4 + r * (size + 6)
        draw.text((4, y + size // 2 - 6), label, fill="black")
        if crops:
            canvas.paste(grid(crops, size, len(crops), gap=4, background=(255, 255, 255)), (110, y))
        else:
            draw.text((114, y + size // 2 - 6), "(no sampled example in this band)", fill="#888")
    return canvas
