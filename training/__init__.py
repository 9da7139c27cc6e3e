"""FaceNet-style training of the model package's networks: data, sampler, miners, losses, loop, evaluation.

Imports ``model``; never ``app``.
"""
