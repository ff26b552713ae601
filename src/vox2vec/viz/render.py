"""Drawing a :class:`~vox2vec.viz.picture.Picture` into a PNG with matplotlib (an optional extra, Agg, no pyplot).

The layout is computed in pixels: panels are sized in proportion to their extent in millimetres (true aspect ratio),
three per row, with the row's legend or colour bar in a column on the right. The PNG is written atomically and
carries a ``Software: vox2vec show`` text chunk, so a later run may replace it (see :mod:`vox2vec.outputs`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vox2vec.config import check_int
from vox2vec.errors import ArgumentError, MissingExtraError
from vox2vec.geometry import Grid
from vox2vec.viz import planes
from vox2vec.viz.picture import Picture, Row
from vox2vec.viz.png import write_png

__all__ = ["DPI", "SOFTWARE", "WIDTH", "WIDTH_RANGE", "check_picture_size", "check_width", "layout", "render",
           "require_matplotlib"]

SOFTWARE = "vox2vec show"
DPI = 100
WIDTH = 1000  # pixels for the three panels of a row together
WIDTH_RANGE = (200, 8000)  # allowed widths: below, panels are unreadable; above, matplotlib's canvas grows past GBs
MAX_HEIGHT = 32000  # pixels; a taller layout (a very long, narrow scan at a large width) is refused
LEFT, TOP, GAP, SIDE, BOTTOM = 40, 24, 6, 170, 6  # margins (px): row titles, column titles, between panels, legend
MARK = "#39ff14"
LABEL_ALPHA, HEAT_ALPHA = 0.45, 0.6


def check_width(width: object) -> int:
    """``width`` as a whole number of pixels in :data:`WIDTH_RANGE`, or an error naming the range (before any work)."""
    problems: list[str] = []
    check_int(problems, "width", width, *WIDTH_RANGE)
    if problems:
        raise ArgumentError(f"{problems[0]} (pixels for the three panels of a row together)")
    return int(width)  # type: ignore[call-overload]


def require_matplotlib() -> None:
    """Import matplotlib or raise :class:`MissingExtraError` naming the extra that provides it."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
    except ImportError:
        raise MissingExtraError("pictures need matplotlib, which is not installed: pip install vox2vec[viz] "
                                "(or pip install 'matplotlib>=3.7')") from None


@dataclass(frozen=True)
class Layout:
    """Pixel boxes (left, top, width, height) of every panel, row by row, and the whole image's size."""

    width: int
    height: int
    panels: tuple[tuple[tuple[int, int, int, int], ...], ...]
    sides: tuple[tuple[int, int, int, int], ...]


def _scale(sizes: list[tuple[float, float]], width: int) -> tuple[float, int]:
    """Pixels per mm that fit the panels' widths into ``width``, and the row height (the tallest panel) it gives."""
    scale = (width - GAP * (len(sizes) - 1)) / sum(w for _, w in sizes)
    return scale, max(1, round(max(h for h, _ in sizes) * scale))


def check_picture_size(grid: Grid, rows: int, width: int) -> None:
    """Refuse, before any embedding, a picture of ``rows`` rows of ``grid``'s planes that would be taller than
    :data:`MAX_HEIGHT` pixels at ``width`` (a long, narrow scan at a large width)."""
    _, row_height = _scale([planes.panel_mm(grid, plane) for plane in planes.PLANES], width)
    height = TOP + rows * (row_height + GAP) - GAP + BOTTOM
    if height > MAX_HEIGHT:
        raise ArgumentError(f"the picture would be {height} pixels tall (at most {MAX_HEIGHT}); pass a smaller width "
                            f"than {width}")


def layout(picture: Picture, width: int = WIDTH) -> Layout:
    """Panels sized by their millimetres at one common scale; each row as tall as its tallest panel; a column on the
    right for a legend or colour bar when a row has one."""
    sizes = [picture.panel_mm(p) for p in range(len(planes.PLANES))]
    scale, row_height = _scale(sizes, width)
    boxes, sides = [], []
    top = TOP
    for _ in picture.rows:
        left, row = LEFT, []
        for h, w in sizes:
            pw, ph = max(1, round(w * scale)), max(1, round(h * scale))
            row.append((left, top + (row_height - ph) // 2, pw, ph))
            left += pw + GAP
        boxes.append(tuple(row))
        sides.append((left + GAP, top, SIDE - 2 * GAP, row_height))
        top += row_height + GAP
    side = SIDE if any(row.kind in ("labels", "heat") for row in picture.rows) else 0  # legend or colour bar
    total_width = max(box[0] + box[2] for row in boxes for box in row) + GAP + side
    return Layout(total_width, top - GAP + BOTTOM, tuple(boxes), tuple(sides))


def _colours(count: int) -> np.ndarray:
    """Distinct RGB colours for classes 1..count (tab10, then tab20, then hues)."""
    from matplotlib import colormaps

    if count <= 10:
        return np.asarray(colormaps["tab10"].colors)[:count]
    if count <= 20:
        return np.asarray(colormaps["tab20"].colors)[:count]
    return colormaps["hsv"](np.linspace(0, 1, count, endpoint=False))[:, :3]


def _axes(figure, box: tuple[int, int, int, int], size: Layout):
    left, top, width, height = box
    axes = figure.add_axes((left / size.width, 1 - (top + height) / size.height, width / size.width,
                            height / size.height))
    axes.set_axis_off()
    return axes


def _draw_row(figure, row: Row, picture: Picture, boxes, side, size: Layout) -> None:
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.patches import Patch

    colours = _colours(len(row.names)) if row.kind == "labels" else None
    mappable = None
    for p, (plane, box) in enumerate(zip(planes.PLANES, boxes)):
        axes = _axes(figure, box, size)
        height, width = picture.panel_mm(p)
        extent = (0.0, width, height, 0.0)
        show = dict(extent=extent, aspect="auto", interpolation="antialiased")
        if row.kind == "rgb":
            axes.imshow(row.panels[p], **show)
        else:
            axes.imshow(picture.grey[p], cmap="gray", vmin=0.0, vmax=1.0, **show)
        if row.kind == "labels":
            labels = row.panels[p]
            overlay = np.zeros((*labels.shape, 4))
            overlay[labels > 0, :3] = colours[labels[labels > 0] - 1]
            overlay[labels > 0, 3] = LABEL_ALPHA
            axes.imshow(overlay, **show)
        elif row.kind == "heat":
            mappable = axes.imshow(np.ma.masked_invalid(row.panels[p]), cmap="turbo", vmin=row.limits[0],
                                   vmax=row.limits[1], alpha=HEAT_ALPHA, **show)
        r, c = picture.marks[p]
        dy, dx = picture.pixel_mm[p]
        axes.plot([(c + 0.5) * dx], [(r + 0.5) * dy], marker="+", markersize=12, markeredgewidth=1.5, color=MARK)
        axes.set_xlim(0, width)
        axes.set_ylim(height, 0)
        if row.kind == "ct":
            top_letter, bottom_letter, left_letter, right_letter = planes.EDGE_LETTERS[plane]
            style = dict(color="yellow", fontsize=8, fontweight="bold", transform=axes.transAxes)
            if box[3] >= 40:  # room for a letter at the top and at the bottom
                axes.text(0.5, 0.98, top_letter, ha="center", va="top", **style)
                axes.text(0.5, 0.02, bottom_letter, ha="center", va="bottom", **style)
            axes.text(0.02, 0.5, left_letter, ha="left", va="center", **style)
            axes.text(0.98, 0.5, right_letter, ha="right", va="center", **style)
    left, top, _, height = boxes[0]
    figure.text((left - 6) / size.width, 1 - (top + height / 2) / size.height, row.title, rotation=90,
                ha="right", va="center", fontsize=8, multialignment="center")
    if row.kind == "labels":
        handles = [Patch(facecolor=colour, edgecolor="none", label=name) for name, colour in zip(row.names, colours)]
        legend_axes = _axes(figure, side, size)
        legend_axes.legend(handles=handles, loc="center left", fontsize=8, frameon=False, borderaxespad=0,
                           title="classes", title_fontsize=8)
    elif row.kind == "heat" and mappable is not None:
        s_left, s_top, _, s_height = side
        bar = (s_left, s_top + s_height // 6, 14, s_height * 2 // 3)
        axes = _axes(figure, bar, size)
        axes.set_axis_on()
        colourbar = figure.colorbar(ScalarMappable(Normalize(*row.limits), "turbo"), cax=axes)
        colourbar.set_label("cosine similarity", fontsize=8)
        colourbar.ax.tick_params(labelsize=7)


def render(picture: Picture, path: str | os.PathLike, width: int = WIDTH) -> Path:
    """Draw ``picture`` and write it to ``path`` (PNG) atomically, marked as written by vox2vec."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    check_picture_size(picture.grid, len(picture.rows), check_width(width))
    size = layout(picture, width)
    figure = Figure(figsize=(size.width / DPI, size.height / DPI), dpi=DPI, facecolor="white")
    canvas = FigureCanvasAgg(figure)
    centre = picture.grid.index_to_world(np.asarray(picture.index, dtype=np.float64)[None])[0]
    world = dict(zip(("x", "y", "z"), centre))  # the planes go through the voxel's centre
    for plane, box in zip(planes.PLANES, size.panels[0]):
        axis = "xyz"[planes.NORMAL[plane]]
        figure.text((box[0] + box[2] / 2) / size.width, 1 - (TOP - 4) / size.height,
                    f"{plane}  {axis} = {world[axis]:.1f} mm", ha="center", va="bottom", fontsize=9)
    for row, boxes, side in zip(picture.rows, size.panels, size.sides):
        _draw_row(figure, row, picture, boxes, side, size)
    canvas.draw()
    pixels = np.asarray(canvas.buffer_rgba())[..., :3]  # opaque: RGB is a quarter smaller than matplotlib's RGBA
    return write_png(pixels, path, SOFTWARE)
