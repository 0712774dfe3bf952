"""Comparison sheets: one composition's images side by side, methods across and seeds down.

A sheet is the quickest way to see what a method does to a composition, so the sweep writes one per
composition as soon as its images exist; the function is plain PIL so notebooks can use it too.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont


def _default_font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=14)
    except TypeError:  # pragma: no cover - Pillow < 10.1
        return ImageFont.load_default()


def comparison_sheet(
    cells: Sequence[Sequence[Image.Image | None]],
    column_labels: Sequence[str],
    row_labels: Sequence[str],
    max_cell: int = 384,
) -> Image.Image:
    """Grid of images (rows x columns) with a label above each column and left of each row.

    Cells are shrunk to fit ``max_cell`` (never enlarged) so a sheet of full-size 1024x768
    images stays viewable; a missing cell is left grey rather than shifting its neighbours.
    """
    font = _default_font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_size(text: str) -> tuple[int, int]:
        left, top, right, bottom = probe.textbbox((0, 0), text, font=font)
        return right - left, bottom - top

    thumbs: list[list[Image.Image | None]] = []
    cell_w, cell_h = 1, 1
    for row in cells:
        thumb_row: list[Image.Image | None] = []
        for img in row:
            if img is None:
                thumb_row.append(None)
                continue
            thumb = img.convert("RGB")
            thumb.thumbnail((max_cell, max_cell), Image.Resampling.LANCZOS)
            cell_w, cell_h = max(cell_w, thumb.width), max(cell_h, thumb.height)
            thumb_row.append(thumb)
        thumbs.append(thumb_row)

    pad = 6
    label_h = max([text_size(t)[1] for t in [*column_labels, *row_labels, "Ag"]]) + 2 * pad
    row_label_w = max([text_size(t)[0] for t in row_labels] + [0]) + 2 * pad
    col_w = max([cell_w] + [text_size(t)[0] + 2 * pad for t in column_labels])
    n_cols = max([len(column_labels)] + [len(r) for r in thumbs])
    width = row_label_w + n_cols * (col_w + pad) + pad
    height = label_h + len(thumbs) * (cell_h + pad) + pad
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    for c, label in enumerate(column_labels):
        x0 = row_label_w + c * (col_w + pad)
        tw, _ = text_size(label)
        draw.text((x0 + (col_w - tw) // 2, pad), label, fill="black", font=font)
    for r, row in enumerate(thumbs):
        y0 = label_h + r * (cell_h + pad)
        if r < len(row_labels):
            _, th = text_size(row_labels[r])
            draw.text((pad, y0 + (cell_h - th) // 2), row_labels[r], fill="black", font=font)
        for c in range(n_cols):
            x0 = row_label_w + c * (col_w + pad)
            thumb = row[c] if c < len(row) else None
            if thumb is None:
                draw.rectangle((x0, y0, x0 + col_w - 1, y0 + cell_h - 1), fill=(200, 200, 200))
            else:
                sheet.paste(thumb, (x0 + (col_w - thumb.width) // 2, y0 + (cell_h - thumb.height) // 2))
    return sheet


__all__ = ["comparison_sheet"]
