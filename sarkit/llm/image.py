"""Read any tile raster as one grayscale band, and encode it as a PNG data URL."""

from __future__ import annotations

import base64
import io
import math

import numpy as np


def read_gray(path: str, max_side: int = 1024) -> tuple[np.ndarray, float]:
    """The tile as uint8 grayscale at most `max_side` pixels a side, and the decimation factor.

    GeoTIFF tiles are single-band uint8 (0 = nodata); JPEG/PNG chips stored as RGB are
    averaged to gray. Large tiles are read decimated (average) so a 5120-pixel tile costs
    what a 1024-pixel one does.
    """
    import rasterio
    from rasterio.enums import Resampling

    with rasterio.open(path) as src:
        factor = max(1.0, max(src.width, src.height) / max_side)
        shape = (max(1, math.ceil(src.height / factor)), max(1, math.ceil(src.width / factor)))
        bands = list(range(1, min(src.count, 3) + 1))
        data = src.read(
            bands,
            out_shape=(len(bands), *shape),
            resampling=Resampling.average if factor > 1 else Resampling.nearest,
        )
    if data.dtype != np.uint8:
        data = np.clip(data, 0, 255)
    gray = data.astype(np.float32).mean(axis=0) if len(bands) > 1 else data[0]
    return np.asarray(np.round(gray), dtype=np.uint8), float(factor)


def png_data_url(path: str, max_side: int = 1024) -> tuple[str, tuple[int, int]]:
    """The tile as a `data:image/png;base64,...` URL (what vision chat APIs accept)."""
    from PIL import Image

    gray, _ = read_gray(path, max_side)
    buf = io.BytesIO()
    Image.fromarray(gray, mode="L").save(buf, format="PNG", compress_level=3)
    encoded = base64.b64encode(buf.getvalue()).decode("ascii")
    return f"data:image/png;base64,{encoded}", (gray.shape[1], gray.shape[0])
