"""The contact sheet: thumbnails of kept tiles and of dropped tiles per reason, one PNG.

A reservoir sample of at most ``per_group`` records per group is kept while the records
stream past (constant memory); the tiles are read again only when the sheet is drawn.
"""

from __future__ import annotations

import io
import os
import random
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from sarkit.atomic import write_bytes

THUMB = 112
LABEL_H = 14
HEADER_H = 22
PAD = 6
COLUMNS = 8
NODATA_RGB = (70, 30, 110)  # nodata shows purple, so a user sees what the rule saw
KEEP_RGB = (40, 170, 80)
DROP_RGB = (200, 50, 50)


@dataclass
class ContactSheet:
    per_group: int = 16
    seed: int = 0
    counts: Counter = field(default_factory=Counter)
    samples: dict[str, list[dict]] = field(default_factory=dict)
    title: str = "sarkit filter"

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def add(
        self,
        record: dict,
        group: str | None = None,
        score: float | None = None,
        path: str | None = None,
    ) -> None:
        """Sample a record into its group: kept / dropped per reason (filter), or the one
        `group` given (search's hits, with their `score` and resolved tile `path`)."""
        quality = record.get("quality") or {}
        if group is None:
            group = "kept" if quality.get("keep", True) else f"dropped: {quality.get('reason')}"
            score = quality.get("score")
        self.counts[group] += 1
        slot = self.samples.setdefault(group, [])
        item = {"id": str(record.get("id")), "path": path or record.get("path"), "score": score}
        n = self.counts[group]
        if len(slot) < self.per_group:
            slot.append(item)
        else:  # reservoir sampling: every record of the group equally likely to be shown
            j = self._rng.randrange(n)
            if j < self.per_group:
                slot[j] = item

    def render(self):
        from PIL import Image, ImageDraw

        groups = sorted(self.samples, key=lambda g: (g != "kept", g))
        rows = []
        for g in groups:
            rows.append(("header", g))
            items = self.samples[g]
            for i in range(0, len(items), COLUMNS):
                rows.append(("tiles", items[i : i + COLUMNS]))
        width = PAD + COLUMNS * (THUMB + PAD)
        cell_h = THUMB + LABEL_H + PAD
        height = PAD + sum(HEADER_H if kind == "header" else cell_h for kind, _ in rows)
        if not rows:
            height = HEADER_H + 2 * PAD
        sheet = Image.new("RGB", (width, height), (24, 24, 24))
        draw = ImageDraw.Draw(sheet)
        if not rows:
            draw.text((PAD, PAD), f"{self.title}: no records", fill=(230, 230, 230))
        y = PAD
        for kind, payload in rows:
            if kind == "header":
                g = payload
                shown = len(self.samples[g])
                colour = DROP_RGB if g.startswith("dropped") else KEEP_RGB
                text = f"{g}: {self.counts[g]} tile(s)" + (
                    f", {shown} shown" if shown < self.counts[g] else ""
                )
                draw.text((PAD, y + 5), text, fill=colour)
                y += HEADER_H
                continue
            for col, item in enumerate(payload):
                x = PAD + col * (THUMB + PAD)
                sheet.paste(_thumbnail(item["path"]), (x, y))
                score = item["score"]
                label = _short(item["id"]) + (f" {score:.2f}" if isinstance(score, float) else "")
                draw.text((x, y + THUMB + 1), label, fill=(210, 210, 210))
            y += cell_h
        return sheet

    def save(self, path: str | os.PathLike) -> None:
        buf = io.BytesIO()
        self.render().save(buf, format="PNG")
        write_bytes(path, buf.getvalue())


def _short(rid: str, limit: int = 13) -> str:
    return rid if len(rid) <= limit else "…" + rid[-(limit - 1) :]


def _thumbnail(path: str | None):
    from PIL import Image, ImageDraw

    from sarkit.quality.features import TileReadError, load_tile

    try:
        tile = load_tile(path or "")
    except TileReadError:
        im = Image.new("RGB", (THUMB, THUMB), (60, 60, 60))
        ImageDraw.Draw(im).text((THUMB // 2 - 3, THUMB // 2 - 6), "?", fill=(230, 230, 230))
        return im
    pixels = tile.pixels
    step = max(1, min(pixels.shape) // (2 * THUMB))
    small = pixels[::step, ::step]  # cheap pre-decimation, then a proper resize
    grey = Image.fromarray(small).convert("RGB").resize((THUMB, THUMB), Image.BILINEAR)
    # paint the nodata *region* the rule measured, not every dark pixel
    region = Image.fromarray((tile.nodata * 255).astype(np.uint8))
    grey.paste(Image.new("RGB", grey.size, NODATA_RGB), (0, 0), region.resize(grey.size))
    return grey
