"""Facts the API and the engine must agree on, in one dependency-free package.

``app/`` (the API schemas, submit validation) and ``workers/engine/`` (which may import
nothing of ``app/``) both import it; it imports neither, only pydantic. What lives here is
what would otherwise be written twice and drift: the steering-op shape and op names, the
sampling defaults, and the shape of the locally generated tiny models.
"""
