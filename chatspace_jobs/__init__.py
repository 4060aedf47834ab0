"""Load a chatspace-jobs job's results in Python (a notebook, a script)::

    import chatspace_jobs as cj

    cj.jobs(state="succeeded")[:3]        # recent jobs, newest first (dicts, as the API's JSON)
    job = cj.job("3f2a...")               # one job
    job.status()["state"]                 # 'succeeded' (read fresh each call)
    job.personas                          # ['curious', 'formal', ...]
    v = job.vectors("pos_neg")            # {persona: tensor(n_layers, hidden)}
    v = job.vectors("pos_neg", layer=2)   # {persona: tensor(hidden)} at model layer 2
    a = job.activations("curious")        # a.tensor (n_samples, n_layers, hidden), a.keys
    job.responses("curious")[0]           # {'key': 'pos_p0_q0', 'response': '...', ...}
    job.axis()                            # the assistant axis (n_layers, hidden), if stored
    job.analysis()                        # per-layer PCA / cosine / axis projections
    job.download("out/")                  # every file, checked against the manifest

Where it reads from: the status API when ``CHATSPACE_API_URL`` is set (with
``CHATSPACE_API_TOKEN``), else the configured database and artifact store (the embedded
default on one machine). ``cj.connect(url, token)`` or ``cj.connect(settings)`` picks
explicitly. A thin layer over :mod:`app.results` and :mod:`app.artifacts`: torch is imported
only when a tensor is asked for.
"""

from __future__ import annotations

from chatspace_jobs.client import Client, connect, job, jobs, workers
from chatspace_jobs.job import Activations, Job

__all__ = ["Activations", "Client", "Job", "connect", "job", "jobs", "workers"]
