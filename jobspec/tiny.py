"""The locally generated ``tiny:<family>`` test models: their name prefix and shape.

The engine builds them with this shape (:mod:`workers.engine.tiny`); submit checks layers
and vector lengths against it before any worker has loaded one (:mod:`app.modelinfo`)."""

TINY_PREFIX = "tiny:"
TINY_LAYERS = 4
TINY_HIDDEN = 128
