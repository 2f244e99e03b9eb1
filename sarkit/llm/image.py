"""Read any tile raster as one grayscale band, and encode it as a PNG data URL."""

from __future__ import annotations

import base64
import io
import math

import numpy as np


def read_gray(path: str, max_side: int = 1024) -> tuple[np.ndarray, float]:
    """The tile as uint8 grayscale at most `max_side` pixels a side, and the decimation factor.

    GeoTIFF tiles are single-band uint8 (0 = nodata); JPEG/PNG chips stored as RGB are
    averaged to gray. Large tiles are block-averaged in numpy rather than by GDAL, whose
    average resampling would skip zero pixels when the file tags 0 as nodata and so brighten
    dark speckle (zeros are common in dark SAR areas); a block that is all nodata stays 0.
    """
    import rasterio

    with rasterio.open(path) as src:
        bands = list(range(1, min(src.count, 3) + 1))
        data = src.read(bands)
    if data.dtype != np.uint8:
        data = np.clip(np.nan_to_num(data), 0, 255)
    gray = data.astype(np.float32).mean(axis=0) if len(bands) > 1 else data[0].astype(np.float32)
    k = max(1, math.ceil(max(gray.shape) / max_side))
    if k > 1:
        h, w = (gray.shape[0] // k) * k, (gray.shape[1] // k) * k
        gray = gray[:h, :w].reshape(h // k, k, w // k, k).mean(axis=(1, 3))
    return np.asarray(np.round(gray), dtype=np.uint8), float(k)


def png_data_url(path: str, max_side: int = 1024) -> tuple[str, tuple[int, int]]:
    """The tile as a `data:image/png;base64,...` URL (what vision chat APIs accept)."""
    from PIL import Image

    gray, _ = read_gray(path, max_side)
    buf = io.BytesIO()
    Image.fromarray(gray, mode="L").save(buf, format="PNG", compress_level=1)
    encoded = base64.b64encode(buf.getvalue()).decode("ascii")
    return f"data:image/png;base64,{encoded}", (gray.shape[1], gray.shape[0])
