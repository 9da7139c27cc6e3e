"""Everything that turns image bytes into a unit vector: network, cost model, weights bundle, faces.

This package imports nothing else of Visage, so the service, data preparation and evaluation all see faces
through the same code.
"""
