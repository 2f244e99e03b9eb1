"""Raster work: resolution-consistent windows, quantisation, tile writing, georeferencing."""
