"""Contact sheets: the query, then one row of top-k thumbnails per measure."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dermris.core.errors import ImageDecodeError
from dermris.core.imageio import decode_image
from dermris.retriever.explain import Explanation, outline_of, stage_summary, unpack_mask
from dermris.retriever.results import Hit

__all__ = ["contact_sheet"]

log = logging.getLogger(__name__)

_LABEL_HEIGHT = 30
_NAME_WIDTH = 90
_PAD = 6


def _font(size: int = 11) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


_OUTLINE = (255, 230, 0)


def _thumbnail(source, size: int, mask: np.ndarray | None = None) -> Image.Image:
    """A ``size`` square tile of ``source``; ``mask`` (a square bool lesion mask over the whole
    image) is drawn as an outline, stretched to the image as the model saw it."""
    tile = Image.new("RGB", (size, size), (60, 60, 60))
    try:
        image = source if isinstance(source, Image.Image) else decode_image(source)[0]
    except (ImageDecodeError, OSError):
        ImageDraw.Draw(tile).text((6, size // 2 - 6), "missing", fill=(220, 220, 220), font=_font())
        return tile
    image = image.convert("RGB").copy()
    image.thumbnail((size, size))
    if mask is not None:
        scaled = np.asarray(
            Image.fromarray(mask).resize(image.size, Image.Resampling.NEAREST), bool
        )
        pixels = np.array(image)
        pixels[outline_of(scaled)] = _OUTLINE
        image = Image.fromarray(pixels)
    tile.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
    return tile


def _fit(text: str, draw: ImageDraw.ImageDraw, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def contact_sheet(
    query,
    results: Mapping[str, Sequence[Hit]],
    out: str | os.PathLike,
    *,
    thumb: int = 128,
    query_label: str = "query",
    resolve=None,
    explanation: Explanation | None = None,
) -> Path:
    """Draw and save a contact sheet as PNG.

    Parameters
    ----------
    query : str, os.PathLike or PIL.Image.Image
        The query image (a file or an image).
    results : mapping of measure name to hits
        A :class:`~dermris.retriever.SearchResult` (``Retriever.search``); when it carries an
        explanation (``search(..., explain=True)``), that is drawn.
    out : path-like
        Output file (PNG).
    thumb : int
        Thumbnail side in pixels.
    query_label : str
        Caption under the query.
    resolve : callable, optional
        ``resolve(stored_path) -> path`` where the image is now (e.g. after the indexed folder
        moved: :meth:`~dermris.retriever.Retriever.locate`).
    explanation : Explanation, optional
        Default: ``results.explanation`` when there is one. Lesion outlines are drawn over the
        query and every hit, and each hit's caption names the stage that makes up most of its
        style loss.

    Returns
    -------
    Path
        ``out``. Images that could not be read are drawn as grey "missing" tiles and logged
        as a warning on stderr.
    """
    out = Path(out)
    if explanation is None:
        explanation = getattr(results, "explanation", None)
    out.parent.mkdir(parents=True, exist_ok=True)  # an unwritable place fails before any drawing
    font = _font()
    k = max((len(h) for h in results.values()), default=0)
    label_height = _LABEL_HEIGHT + (13 if explanation is not None else 0)
    cell_w, cell_h = thumb + _PAD, thumb + label_height + _PAD
    width = _NAME_WIDTH + max(1, k) * cell_w + _PAD
    height = (len(results) + 1) * cell_h + _PAD
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)

    def mask_of(packed) -> np.ndarray | None:
        return None if explanation is None else unpack_mask(packed, explanation.mask_size)

    def place(
        row: int, col: int, source, lines: Sequence[str], mask: np.ndarray | None = None
    ) -> None:
        x = _NAME_WIDTH + col * cell_w
        y = _PAD + row * cell_h
        sheet.paste(_thumbnail(source, thumb, mask), (x, y))
        for i, line in enumerate(lines):
            draw.text(
                (x, y + thumb + 2 + 13 * i),
                _fit(line, draw, font, thumb),
                fill=(0, 0, 0),
                font=font,
            )

    draw.text((_PAD, _PAD + thumb // 2), "query", fill=(0, 0, 0), font=font)
    place(
        0,
        0,
        query,
        [query_label],
        mask_of(explanation.query_mask) if explanation is not None else None,
    )
    missing: list[str] = []
    for r, (measure, hits) in enumerate(results.items(), start=1):
        draw.text((_PAD, _PAD + r * cell_h + thumb // 2), measure, fill=(0, 0, 0), font=font)
        for c, hit in enumerate(hits):
            source = resolve(hit.path) if resolve is not None else hit.path
            if not os.path.isfile(source):
                missing.append(hit.path)
            lines = [hit.image_id, f"{hit.score:.4f}"]
            if explanation is not None:
                summary = stage_summary(explanation, hit, 1)  # at most one stage
                top = summary[0] if summary else None
                lines.append(
                    f"style: stage {top.stage + 1} {100 * top.share:.0f}%"
                    if top is not None
                    else "style: same"
                )
            place(
                r,
                c,
                source,
                lines,
                mask_of(explanation.masks[hit.row]) if explanation is not None else None,
            )
    if missing:
        unique = list(dict.fromkeys(missing))
        log.warning(
            "%d result images are missing (drawn grey): %s%s; "
            "if the indexed folder moved, give its new place with --image-root",
            len(unique),
            ", ".join(unique[:3]),
            " ..." if len(unique) > 3 else "",
        )
    sheet.save(out, format="PNG")
    return out
