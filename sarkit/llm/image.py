"""Read any tile raster as one grayscale band, and encode it as a PNG data URL."""

from __future__ import annotations

import base64
import io

import numpy as np


def read_gray(path: str, max_side: int = 1024) -> tuple[np.ndarray, float]:
    """The tile as uint8 grey at most `max_side` pixels a side, and the decimation factor.

    The pixels are the shared reader's (`sarkit.raster.tileread`), so the LLM sees what the
    filter measured and the model trains on; large tiles are block-mean decimated with
    zeros kept (dark speckle stays dark). Raises the reader's TileReadError, which the
    caption chain takes as that one tile's failure.
    """
    from sarkit.raster.tileread import block_mean, read_u8

    gray = read_u8(path)
    small, k = block_mean(gray, max_side)
    return small, float(k)


def png_data_url(path: str, max_side: int = 1024) -> tuple[str, tuple[int, int]]:
    """The tile as a `data:image/png;base64,...` URL (what vision chat APIs accept)."""
    from PIL import Image

    gray, _ = read_gray(path, max_side)
    buf = io.BytesIO()
    Image.fromarray(gray, mode="L").save(buf, format="PNG", compress_level=1)
    encoded = base64.b64encode(buf.getvalue()).decode("ascii")
    return f"data:image/png;base64,{encoded}", (gray.shape[1], gray.shape[0])
