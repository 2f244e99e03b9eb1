"""The built-in slice and georef stages, registered as a plugin (last in line)."""

from __future__ import annotations

from sarkit.plugins import hookimpl


@hookimpl(trylast=True)
def sarkit_slice(scene, options, report):
    from sarkit.raster.slicer import slice_scene

    return slice_scene(scene, options, report)


@hookimpl(trylast=True)
def sarkit_georef(record, options):
    from sarkit.raster.georef import georeference

    return georeference(record, options)
