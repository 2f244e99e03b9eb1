"""`georef`: a tile's WGS84 centre and footprint (from its own affine transform or GCPs) and
the nearest GeoNames place, offline."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import rasterio
from rasterio.errors import RasterioIOError
from rasterio.transform import AffineTransformer, GCPTransformer
from rasterio.warp import transform as warp_transform

from sarkit.atomic import atomic_open
from sarkit.errors import SarkitError

EARTH_RADIUS_KM = 6371.0088


@dataclass
class GeorefOptions:
    geocode: bool = True


def haversine_km(lon1: float, lat1: float, lon2: float, lat2: float) -> float:
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(math.sqrt(a))


def nearest_place(lon: float, lat: float) -> dict:
    """The nearest GeoNames city (population > 1000), from reverse_geocoder's offline table."""
    import reverse_geocoder

    hit = reverse_geocoder.search([(lat, lon)], mode=1, verbose=False)[0]
    return {
        "name": hit["name"],
        "admin1": hit["admin1"],
        "country": hit["cc"],
        "distance_km": round(haversine_km(lon, lat, float(hit["lon"]), float(hit["lat"])), 3),
    }


def tile_corners_wgs84(path: str, record_id: str) -> tuple[list[list[float]], list[float]]:
    """Closed footprint ring (ul, ur, lr, ll, ul) and centre, as [lon, lat] in WGS84."""
    if os.path.isdir(path):
        raise SarkitError(f"{record_id}: tile {path} is a folder, not a tile file")
    try:
        with rasterio.open(path) as ds:
            width, height = ds.width, ds.height
            gcps, gcp_crs = ds.gcps
            if gcps and ds.transform.is_identity:
                transformer, crs = GCPTransformer(gcps), gcp_crs
            elif ds.crs is not None:
                transformer, crs = AffineTransformer(ds.transform), ds.crs
            else:
                raise SarkitError(f"{record_id}: tile {path} has no georeferencing; skipped")
    except RasterioIOError:
        if not os.path.exists(path):
            raise SarkitError(f"{record_id}: tile file {path} not found") from None
        raise SarkitError(f"{record_id}: tile file {path} is not a readable raster") from None
    rows = [0, 0, height, height, height / 2]
    cols = [0, width, width, 0, width / 2]
    xs, ys = transformer.xy(rows, cols, offset="ul")
    lons, lats = warp_transform(crs, "EPSG:4326", list(xs), list(ys))
    ring = [[round(lon, 8), round(lat, 8)] for lon, lat in zip(lons[:4], lats[:4], strict=True)]
    ring.append(ring[0])
    return ring, [round(lons[4], 8), round(lats[4], 8)]


def georeference(record: dict, options: GeorefOptions) -> dict:
    rid = record.get("id", "?")
    if "path" not in record:
        raise SarkitError(f"{rid}: record has no 'path' to a tile")
    footprint, center = tile_corners_wgs84(record["path"], rid)
    geo = {"center": center, "footprint": footprint}
    if options.geocode:
        geo["place"] = nearest_place(*center)
    return {**record, "geo": geo}


class GeoJSONWriter:
    """A FeatureCollection of footprints streamed to a temporary file, renamed when complete."""

    def __init__(self, path: str | Path):
        self.path = path
        self._ctx = atomic_open(path, "w", encoding="utf-8")
        self._fh: IO[str] | None = None
        self._first = True

    def __enter__(self) -> GeoJSONWriter:
        self._fh = self._ctx.__enter__()
        self._fh.write('{"type": "FeatureCollection", "features": [\n')
        return self

    def add(self, record: dict, extra: dict | None = None) -> None:
        """One footprint; `extra` adds properties (search: score and rank)."""
        geo = record["geo"]
        place = geo.get("place") or {}
        feature = {
            "type": "Feature",
            "id": record["id"],
            "geometry": {"type": "Polygon", "coordinates": [geo["footprint"]]},
            "properties": {
                "id": record["id"],
                "scale": record.get("scale"),
                "parent": record.get("parent"),
                "sensor": record.get("sensor"),
                "path": record.get("path"),
                "place": place.get("name"),
                "country": place.get("country"),
                **(extra or {}),
            },
        }
        self._fh.write(("" if self._first else ",\n") + json.dumps(feature))
        self._first = False

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self._fh.write("\n]}\n")
        return self._ctx.__exit__(exc_type, exc, tb)
