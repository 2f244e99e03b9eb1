"""Raster work: resolution-consistent windows, quantisation to uint8, tile writing, georeferencing."""
