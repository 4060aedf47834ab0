"""Which results to read: a :class:`Client` over one source (API or store) and the
module-level shortcuts that use a default one."""

from __future__ import annotations

from chatspace_jobs.job import Job

_default = None


class Client:
    """Jobs read through one :class:`app.results.Source`."""

    def __init__(self, source):
        self.source = source

    def __repr__(self) -> str:
        return f"chatspace_jobs.Client({self.source.where})"

    def jobs(self, *, state: str | None = None, kind: str | None = None,
             dataset: str | None = None, model: str | None = None,
             limit: int = 50) -> list[dict]:
        """Recent jobs, newest first, as the API's JSON (``id``, ``state``, ``progress``...)."""
        return self.source.jobs(state=state, kind=kind, dataset=dataset, model=model,
                                limit=limit)

    def job(self, job_id: str) -> Job:
        return Job(self.source, self.source.job(job_id))

    def workers(self) -> list[dict]:
        return self.source.workers()


def connect(api_url: str | None = None, token: str | None = None, *, settings=None) -> Client:
    """A client on the API at ``api_url`` (bearer ``token``), or, without a URL, on the
    database and store of ``settings`` (default: the ``CHATSPACE_*`` environment, which
    means the API when ``CHATSPACE_API_URL`` is set). Becomes the default for ``cj.jobs()``."""
    global _default
    from app.results import ApiSource, StoreSource, default_source

    if api_url:
        source = ApiSource(api_url, token)
    elif settings is not None:
        source = StoreSource(settings)
    else:
        source = default_source()
    _default = Client(source)
    return _default


def _client() -> Client:
    return _default if _default is not None else connect()


def jobs(**filters) -> list[dict]:
    """Recent jobs (see :meth:`Client.jobs`)."""
    return _client().jobs(**filters)


def job(job_id: str) -> Job:
    """One job (see :class:`Job`)."""
    return _client().job(job_id)


def workers() -> list[dict]:
    return _client().workers()
