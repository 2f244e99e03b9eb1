"""The `offline` backend: no network, deterministic, grounded in the tile and its record.

It walks the same five HCoT layers as the prompts, from what the record and the pixels say:
(1) Earth cognition from the position and nearest place, (2) social priors from the place's
distance and country, (3) SAR theory from band, polarisation and backscatter statistics,
(4) instance-level discrimination from a CFAR detector with sizes in metres, (5) calibration:
each statement carries its confidence. It is the template-text baseline of the paper's
ablation and lets anyone run the whole pipeline without a key.
"""

from __future__ import annotations

import math
from typing import Any

from sarkit.caption.templates import WAVELENGTHS
from sarkit.llm.base import Answer, BackendError, Model, Request
from sarkit.llm.sarstats import Target, TileStats

NAME = "offline"
VERSION = "offline-1"  #: bump when the wording or the measurements change


def position(row: float, col: float) -> str:
    """Where in the tile, in image terms (the tile need not be north-up)."""
    v = "upper" if row < 0.36 else "lower" if row > 0.64 else ""
    h = "left" if col < 0.36 else "right" if col > 0.64 else ""
    if v and h:
        return f"the {v}-{h} part"
    if v or h:
        return f"the {v or h} part"
    return "the centre"


def plural(n: int, word: str, many: str | None = None) -> str:
    return f"{n} {word if n == 1 else (many or word + 's')}"


def pct(frac: float) -> str:
    return f"{100 * frac:.0f}%" if frac >= 0.01 else "under 1%"


def sure(level: str) -> str:
    return f"({level} confidence)"


def metres(x: float) -> str:
    return f"{x:.0f} m" if x >= 10 else f"{x:.1f} m"


#: Size ladders (upper length bound in metres, reading), shortest first.
VESSEL_SIZES = (
    (15, "small boat"),
    (50, "fishing vessel or small craft"),
    (120, "coaster or medium-sized ship"),
    (250, "cargo ship or tanker"),
    (math.inf, "large container ship or tanker"),
)
GROUND_SIZES = (
    (6, "car-sized vehicle"),
    (12, "truck- or armoured-vehicle-sized object"),
    (20, "bus- or large-truck-sized object, or a small structure"),
    (45, "narrow-body-aircraft-sized object or small building"),
    (80, "wide-body-aircraft-sized object or building"),
    (math.inf, "large structure such as a hall or storage tank group"),
)


def size_reading(t: Target, ladder: tuple[tuple[float, str], ...]) -> str:
    return next(name for limit, name in ladder if t.length_m < limit)


def vessel_class(t: Target) -> str:
    return size_reading(t, VESSEL_SIZES)


def ground_class(t: Target) -> str:
    return size_reading(t, GROUND_SIZES)


def spread(targets: list[Target]) -> str:
    if len(targets) < 2:
        return ""
    rows = [t.row for t in targets]
    cols = [t.col for t in targets]
    sd = math.hypot(_std(rows), _std(cols))
    return (
        "clustered together"
        if sd < 0.12
        else "spread across the tile"
        if sd > 0.3
        else ("loosely grouped")
    )


def _std(xs: list[float]) -> float:
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))


def _centroid(targets: list[Target]) -> tuple[float, float]:
    return (sum(t.row for t in targets) / len(targets), sum(t.col for t in targets) / len(targets))


def _sizes(targets: list[Target]) -> str:
    lengths = sorted(t.length_m for t in targets)
    widths = sorted(t.width_m for t in targets)
    if len(lengths) == 1:
        return f"about {metres(lengths[0])} long and {metres(widths[0])} wide"
    mid = lengths[len(lengths) // 2]
    return (
        f"{metres(lengths[0])} to {metres(lengths[-1])} long (median {metres(mid)}), "
        f"{metres(widths[0])} to {metres(widths[-1])} wide"
    )


class Reading:
    """The five-layer reading of one tile; the task fields are worded from it."""

    def __init__(self, record: dict, stats: TileStats, parent: dict | None, stage: str):
        self.r = record
        self.s = stats
        self.parent = parent
        self.stage = stage
        geo = record.get("geo") or {}
        self.place = geo.get("place") or {}
        self.center = geo.get("center")
        self.band = str(record.get("band") or "unknown")
        self.pol = str(record.get("polarization") or "unknown")
        self.sensor = str(record.get("sensor") or "an unknown sensor")
        s = stats
        self.other_dark = max(0.0, s.dark_frac - s.water_frac)
        self.vessels = s.water_targets
        # runway-sized: at least 800 m long and 25-100 m wide
        self.runways = [(a, b) for a, b in s.dark_strips if a >= 800 and 25 <= b <= 100]
        self.land_targets = s.land_targets
        self.grid = self._grid()
        self.terrain, self.terrain_conf = self._terrain()
        self.hilly = self.terrain.startswith("hilly")
        self.layers = self._layers()

    # -- layer 1 and 2: geography and social priors -----------------------------------
    def where(self) -> str:
        if not self.place:
            return "at an unknown location (no geographic position in the record)"
        name = ", ".join(
            str(x)
            for x in (self.place.get("name"), self.place.get("admin1"), self.place.get("country"))
            if x
        )
        dist = self.place.get("distance_km")
        if dist is None:
            return f"near {name}"
        return f"{float(dist):.0f} km from {name}" if dist >= 1 else f"at {name}"

    def climate(self) -> str:
        if not self.center:
            return ""
        lat = abs(float(self.center[1]))
        zone = (
            "tropical"
            if lat < 23.5
            else "subtropical"
            if lat < 35
            else "temperate"
            if lat < 55
            else "subpolar"
            if lat < 66.5
            else "polar"
        )
        hemi = "northern" if float(self.center[1]) >= 0 else "southern"
        return f"{zone} latitudes of the {hemi} hemisphere"

    def remoteness(self) -> str:
        dist = self.place.get("distance_km") if self.place else None
        if dist is None:
            return "unknown distance to settlements"
        if dist < 5:
            return "within or at the edge of a listed populated place"
        if dist < 25:
            return "in the surroundings of a listed populated place"
        return f"remote from listed settlements ({float(dist):.0f} km to the nearest)"

    def _layers(self) -> list[str]:
        s = self.s
        wl = WAVELENGTHS.get(self.band, "unknown wavelength")
        l1 = f"Earth cognition: tile {self.where()}"
        if self.climate():
            l1 += f", {self.climate()}"
        l2 = f"Social priors: {self.remoteness()}"
        l3 = (
            f"SAR theory: {self.sensor} {self.band} band ({wl}), {self.pol}; grey levels "
            f"median {s.median:.0f}, 5-95% {s.p5:.0f}-{s.p95:.0f}; dark homogeneous "
            f"{pct(s.dark_frac)} (water-like {pct(s.water_frac)}), bright textured "
            f"{pct(s.built_frac)}, large-scale relief index {s.relief:.2f}"
        )
        l4 = (
            f"Instance level at {s.px_m:.2f} m/pixel: CFAR found {len(s.targets)} bright "
            f"point targets ({len(self.vessels)} on water), {len(s.lines)} straight linear "
            f"features"
        )
        l5 = f"Calibration: terrain read as {self.terrain} {sure(self.terrain_conf)}"
        return [l1, l2, l3, l4, l5]

    # -- layer 3 to 5: the decisions ----------------------------------------------------
    def _grid(self) -> bool:
        angles = self.s.line_orientations()
        if len(angles) < 2:
            return False
        d = abs(angles[0] - angles[1]) % 180
        return 70 <= d <= 110

    def _terrain(self) -> tuple[str, str]:
        local, conf = self._local_terrain()
        # HCoT-MIS: a finer tile is read against its parent's reading; a hilly parent keeps a
        # child hilly unless the child itself clearly shows water or dense built-up land
        parent_terrain = ((self.parent or {}).get("texts") or {}).get("Terrain", "")
        if "hilly or mountainous" in parent_terrain and not local.startswith(
            ("hilly", "open water", "coastal", "land-water", "flat urbanised")
        ):
            scale = (self.parent or {}).get("scale") or "larger"
            return (
                f"hilly or mountainous area (as read at the {scale} scale); locally {local}",
                "low" if conf == "low" else "medium",
            )
        return local, conf

    def _local_terrain(self) -> tuple[str, str]:
        s = self.s
        if s.water_frac >= 0.85:
            conf = "high" if s.dark_flatness < 0.12 else "medium"
            return "open water (sea, or a large lake or river)", conf
        if s.water_frac >= 0.15:
            if s.built_frac >= 0.05 or len(self.land_targets) >= 10:
                return "coastal or riverside lowland with built-up land along the water", "medium"
            return "land-water interface (coast, river or lake shore)", "medium"
        if s.relief >= 0.35 and s.built_frac < 0.2:
            extra = (
                " with extensive dark, low-backscatter surfaces (smooth bare ground, ash or "
                "lava fields, or radar shadow)"
                if self.other_dark >= 0.3
                else ""
            )
            return f"hilly or mountainous area{extra}", "medium"
        if s.built_frac >= 0.2:
            return "flat urbanised plain", "medium"
        if s.built_frac >= 0.05:
            return "plain with scattered settlement", "low"
        return "flat to gently undulating open land", "low"

    def parent_note(self) -> str:
        if not self.parent:
            return ""
        texts = self.parent.get("texts") or {}
        first = next(iter(texts.values()), "")
        if not first:
            return ""
        return f"; the enclosing {self.parent.get('scale', 'larger')} tile reads: " + _clip(first)

    # -- terrain fields ---------------------------------------------------------------
    def terrain_fields(self) -> dict[str, str]:
        s = self.s
        return (
            {
                "Terrain": f"The terrain is classified as {self.terrain} {sure(self.terrain_conf)}",
                "Functionality": "The area functionality is described as "
                + self._function()
                + self.parent_note(),
                "Distribution": "Functional distribution: " + self._distribution(),
                "Layout": "Spatial layout: " + self._layout(),
                "Boundary": "Boundary features: " + self._boundary(),
                "Buildings": "Building presence: " + self._buildings(),
                "Roads": "Road presence: " + self._roads(),
                "Water": "Water presence: " + self._water(),
            }
            if s
            else {}
        )

    def _function(self) -> str:
        s = self.s
        nv = len(self.vessels)
        if s.water_frac >= 0.85:
            if nv:
                return (
                    f"maritime area with vessel traffic: {nv} vessel-like "
                    f"target{'s' if nv > 1 else ''} on the water {sure('high')}"
                )
            return f"open water with no vessels detected {sure('medium')}"
        if s.water_frac >= 0.15 and s.built_frac >= 0.05:
            if nv:
                return (
                    f"port or harbour area: built-up land along the water with {nv} "
                    f"vessel-like targets {sure('medium')}"
                )
            return f"waterfront built-up area {sure('medium')}"
        if self.runways:
            return (
                f"possibly an airfield: {plural(len(self.runways), 'runway-sized dark strip')} "
                f"{sure('low')}"
            )
        if s.water_frac >= 0.15:
            if nv:
                return (
                    f"coastal waters with {plural(nv, 'vessel-like target')} beside open land "
                    f"{sure('medium')}"
                )
            return f"shore between open land and water {sure('medium')}"
        if s.built_frac >= 0.2:
            kind = "planned, grid-like urban district" if self.grid else "urban built-up area"
            return f"{kind} of mixed or undetermined use {sure('medium')}"
        if self.hilly and s.built_frac < 0.2:
            return f"natural terrain with no clear human function {sure('medium')}"
        if s.built_frac >= 0.05:
            return f"rural land with scattered settlement {sure('low')}"
        return f"open land, natural or agricultural {sure('low')}"

    def _distribution(self) -> str:
        s = self.s
        parts = []
        if s.water_regions:
            big = max(s.water_regions, key=lambda r: r.area_frac)
            parts.append(f"water occupies {position(big.row, big.col)} ({pct(s.water_frac)})")
        if s.built_frac >= 0.01:
            what = (
                "bright sensor-facing slopes lie"
                if self.terrain.startswith("hilly")
                else "built-up blocks concentrate"
            )
            parts.append(f"{what} in {position(s.built_row, s.built_col)} ({pct(s.built_frac)})")
        if self.other_dark >= 0.1:
            parts.append(f"dark low-backscatter ground covers {pct(self.other_dark)}")
        if self.vessels:
            r, c = _centroid(self.vessels)
            parts.append(f"vessels lie mainly in {position(r, c)}")
        if len(self.land_targets) >= 3:
            r, c = _centroid(self.land_targets)
            parts.append(f"bright point targets on land centre on {position(r, c)}")
        if not parts:
            return f"a largely uniform surface with no distinct functional zones {sure('medium')}"
        return "; ".join(parts) + f" {sure('medium')}"

    def _layout(self) -> str:
        s = self.s
        angles = s.line_orientations()
        if self.grid:
            text = "networked, grid-like layout of straight corridors crossing at right angles"
        elif len(s.lines) >= 3 and angles:
            text = f"linear layout organised along corridors oriented about {angles[0]:.0f} deg"
        elif s.lines:
            text = "irregular layout with one or two straight corridors"
        elif s.water_frac >= 0.85:
            text = "open, unstructured water surface"
        elif self.hilly:
            text = "irregular, organic, terrain-following layout"
        else:
            text = "irregular, diffuse layout without a dominant pattern"
        if len(s.targets) >= 2:
            text += f"; point targets are {spread(s.targets)}"
        return f"{text} {sure('low' if not s.lines else 'medium')}"

    def _boundary(self) -> str:
        s = self.s
        if 0.02 <= s.water_frac < 0.98:
            kind = (
                "straight, artificial shoreline (quays, embankments)"
                if s.shoreline_straightness > 0.4
                else "natural, irregular shoreline"
            )
            return f"sharp land-water boundary, a {kind} {sure('medium')}"
        if s.built_frac >= 0.05:
            return (
                f"abrupt edges between {s.built_blocks} bright built-up blocks and darker "
                f"open ground {sure('medium')}"
            )
        if self.terrain.startswith("hilly"):
            return (
                "gradual transitions following the slopes: bright sensor-facing slopes "
                f"against dark back slopes and shadow {sure('medium')}"
            )
        if s.water_frac >= 0.98:
            return f"no land boundary inside the tile {sure('high')}"
        return f"gradual, diffuse transitions without sharp artificial edges {sure('low')}"

    def _buildings(self) -> str:
        s = self.s
        if s.water_frac >= 0.85 and s.built_frac < 0.03:
            return f"none: the tile is open water {sure('high')}"
        if self.hilly and s.built_blocks:
            return (
                f"unlikely: the {s.built_blocks} bright textured patches "
                f"({pct(s.built_frac)}, in {position(s.built_row, s.built_col)}) sit in "
                "steep terrain, where sensor-facing slopes (foreshortening, layover) are "
                f"bright without any buildings {sure('low')}"
            )
        if s.built_frac >= 0.2:
            return (
                f"prominent: bright textured blocks cover {pct(s.built_frac)} of the tile "
                f"({s.built_blocks} blocks), mainly in {position(s.built_row, s.built_col)} "
                f"{sure('medium')}"
            )
        if s.built_frac >= 0.03:
            return (
                f"moderate: {s.built_blocks} bright textured blocks ({pct(s.built_frac)}) "
                f"in {position(s.built_row, s.built_col)}, consistent with buildings "
                f"(double bounce) {sure('medium')}"
            )
        if s.built_blocks:
            return (
                f"sparse: only {plural(s.built_blocks, 'small bright block')} "
                f"({pct(s.built_frac)}); "
                f"isolated structures at most {sure('low')}"
            )
        return f"no building-like bright blocks detected {sure('medium')}"

    def _roads(self) -> str:
        s = self.s
        strips = ""
        if s.dark_strips:
            sizes = ", ".join(f"{metres(a)} x {metres(b)}" for a, b in s.dark_strips[:4])
            strips = (
                f"{plural(len(s.dark_strips), 'long, straight dark strip')} ({sizes}): smooth "
                f"surfaces such as runways, wide roads or canals {sure('medium')}"
            )
        if not s.lines:
            if strips:
                return strips
            if s.water_frac >= 0.85:
                return f"none: open water {sure('high')}"
            return f"no clearly visible straight roads or runways {sure('low')}"
        longest = max(length for length, _ in s.lines)
        angles = s.line_orientations()
        dirs = " and ".join(f"{a:.0f} deg" for a in angles) or "several directions"
        text = (
            f"{plural(len(s.lines), 'straight linear feature')} (longest about "
            f"{metres(longest)}), oriented {dirs}: likely roads, quays, runways or field "
            f"boundaries {sure('low' if len(s.lines) < 3 else 'medium')}"
        )
        return f"{strips}; {text}" if strips else text

    def _water(self) -> str:
        s = self.s
        if s.water_frac >= 0.02:
            big = max(s.water_regions, key=lambda r: r.area_frac)
            kind = (
                "open to the tile edge (sea, bay or a large river)"
                if big.touches_edge
                else "enclosed (pond, basin or lake)"
            )
            shape = " and elongated, like a river or channel" if big.elongation > 3 else ""
            conf = "high" if s.dark_flatness < 0.12 else "medium"
            return (
                f"dark, homogeneous water covering {pct(s.water_frac)} of the tile in "
                f"{position(big.row, big.col)}, {kind}{shape} {sure(conf)}"
            )
        if self.other_dark >= 0.1:
            return (
                f"no water body detected; the dark areas ({pct(s.dark_frac)}) vary too much "
                "in tone to be calm water and are more likely smooth bare ground or radar "
                f"shadow {sure('medium')}"
            )
        if s.dark_strips:
            return (
                f"no water body detected; the {plural(len(s.dark_strips), 'dark strip')} "
                f"{'is' if len(s.dark_strips) == 1 else 'are'} straight-sided, more likely "
                f"runways or roads than water (a straight canal is possible) {sure('low')}"
            )
        return f"no water body detected {sure('medium')}"

    # -- marine fields ------------------------------------------------------------------
    def marine_fields(self) -> dict[str, str]:
        s = self.s
        v = self.vessels
        n = len(v)
        if s.water_frac >= 0.85:
            scene = "open sea or large open water"
        elif s.water_frac >= 0.15:
            scene = (
                "harbour or inshore waters next to built-up land"
                if s.built_frac >= 0.05
                else "coastal or inshore waters"
            )
        else:
            scene = "mostly land, with little or no open water"
        sea = (
            f"dark and homogeneous (median grey level {s.median:.0f}), a calm to moderately "
            f"rough surface"
            if s.dark_flatness < 0.12
            else "dark with large-scale tonal variation: wind-roughened water, slicks or fronts"
        )
        if s.water_frac < 0.02:
            sea = "no water surface to assess"
        fields = {
            "Scene": f"Marine scene: {scene}, {self.where()} {sure('medium')}" + self.parent_note(),
            "Sea": f"Sea surface: {sea} {sure('medium')}",
            "Ships": (
                "Ship presence: "
                + (
                    f"{n} bright point scatterer{'s' if n > 1 else ''} on the water stand far "
                    f"above the sea clutter (CFAR), typical of metal hulls {sure('high')}"
                    if n
                    else f"no vessel-like targets stand out from the sea clutter {sure('medium')}"
                )
            ),
            "Quantity": f"Ship count: {n} vessel-like target{'s' if n != 1 else ''} "
            f"{sure('medium')}",
            "Size": "Ship size: "
            + (
                f"{_sizes(v)}, measured at {s.px_m:.1f} m per pixel {sure('medium')}"
                if n
                else "not applicable, no vessels"
            ),
            "Category": "Ship category: "
            + (self._vessel_categories(v) if n else "not applicable, no vessels"),
            "Distribution": "Target distribution: "
            + (
                f"in {position(*_centroid(v))} of the tile"
                + (f", {spread(v)}" if n > 1 else "")
                + f" {sure('medium')}"
                if n
                else f"no targets on the water {sure('medium')}"
            ),
            "Coast": "Coast and structures: " + self._coast(),
        }
        return fields

    def _vessel_categories(self, v: list[Target]) -> str:
        counts: dict[str, int] = {}
        for t in v:
            counts[vessel_class(t)] = counts.get(vessel_class(t), 0) + 1
        text = ", ".join(f"{k} x{c}" if c > 1 else k for k, c in counts.items())
        return f"by length, likely {text} {sure('low')}"

    def _coast(self) -> str:
        s = self.s
        if s.water_frac >= 0.98:
            return f"no land or fixed structures in the tile {sure('high')}"
        land = 1 - s.water_frac
        text = f"land covers {pct(land)}"
        if s.built_frac >= 0.03:
            text += f", with built-up blocks in {position(s.built_row, s.built_col)}"
        if self.land_targets:
            text += f" and {len(self.land_targets)} bright fixed or berthed targets"
        return f"{text} {sure('medium')}"

    # -- ground fields --------------------------------------------------------------------
    def ground_fields(self) -> dict[str, str]:
        s = self.s
        t = self.land_targets
        n = len(t)
        background = f"median grey level {s.median:.0f}, texture {s.texture:.2f}; " + (
            "dark smooth ground (tarmac, bare soil or shadow) dominates"
            if s.dark_frac >= 0.5
            else "bright textured built-up ground dominates"
            if s.built_frac >= 0.2
            else "mixed, moderately bright ground"
        )
        structure = "not applicable, no targets"
        if n:
            elong = sum(x.length_m / max(x.width_m, 0.1) for x in t) / n
            shape = "elongated" if elong > 2.5 else "compact"
            structure = (
                f"{shape} bright scatterers (mean length/width {elong:.1f}), peak grey "
                f"level up to {max(x.peak for x in t)} {sure('low')}"
            )
        return {
            "Scene": f"Ground scene: {self._function()}, {self.where()}" + self.parent_note(),
            "Background": f"Background: {background} {sure('medium')}",
            "Targets": "Target presence: "
            + (
                f"{n} discrete bright target{'s' if n > 1 else ''} on land stand"
                f"{'' if n > 1 else 's'} out from the background (CFAR) "
                f"{sure('medium')}"
                if n
                else f"no discrete targets detected {sure('medium')}"
            ),
            "Quantity": f"Target count: {n} {sure('medium')}",
            "Size": "Target size: "
            + (
                f"{_sizes(t)} at {s.px_m:.1f} m per pixel {sure('medium')}"
                if n
                else "not applicable"
            ),
            "Category": "Target category: "
            + (self._ground_categories(t) if n else "not applicable"),
            "Structure": f"Target structure: {structure}",
            "Distribution": "Target distribution: "
            + (
                f"in {position(*_centroid(t))}"
                + (f", {spread(t)}" if n > 1 else "")
                + f" {sure('medium')}"
                if n
                else "none"
            ),
        }

    def _ground_categories(self, t: list[Target]) -> str:
        counts: dict[str, int] = {}
        for x in t:
            counts[ground_class(x)] = counts.get(ground_class(x), 0) + 1
        top = sorted(counts.items(), key=lambda kv: -kv[1])[:3]
        text = ", ".join(f"{k} x{c}" for k, c in top)
        return f"by size, {text} {sure('low')}"


def _clip(text: str, n: int = 140) -> str:
    text = text.strip().rstrip(".")
    return text if len(text) <= n else text[: n - 3].rsplit(" ", 1)[0] + "..."


class OfflineClient:
    def __init__(self, model: Model, options: Any):
        self.model = model

    def estimate(self, request: Request) -> tuple[int, int]:
        return 0, 0

    def complete(self, request: Request, repair: tuple[str, str] | None = None) -> Answer:
        from sarkit.llm.image import read_gray
        from sarkit.llm.sarstats import analyse

        record = request.record
        gray, factor = read_gray(request.image_path, 1024)
        px_m = float(record.get("pixel_m") or 1.0) * factor
        stats = analyse(gray, px_m)
        reading = Reading(record, stats, request.parent, request.scale_stage)
        maker = {
            "terrain": reading.terrain_fields,
            "marine": reading.marine_fields,
            "ground": reading.ground_fields,
        }.get(request.task.name)
        if maker is None:
            raise BackendError(
                f"the offline backend words the terrain, marine and ground tasks only, "
                f"not '{request.task.name}'"
            )
        fields = maker()
        return Answer(text="", fields=fields, extra={"layers": reading.layers})

    def close(self) -> None:
        pass


class OfflineBackend:
    name = NAME

    def __init__(self) -> None:
        self.models = [
            Model(
                "offline",
                NAME,
                model_id=VERSION,
                description="no network: five-layer reading of the pixels and the record",
            ),
        ]

    def connect(self, model: Model, options: Any) -> OfflineClient:
        return OfflineClient(model, options)
