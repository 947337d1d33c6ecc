"""A reference GPU service for gpuq: sentence embeddings (all-MiniLM-L6-v2) behind the SPEC §4 contract.

Copy it to wrap your own model: replace ``model.py`` (load once, ``embed()`` blocking), keep the rest.

    model.py           the model: load it, run it, say which errors are worth retrying
    embed_service.py   the HTTP side: bearer check, body checks, 202, slots, the background job
    callback.py        calling the dispatcher back: retries with backoff, heartbeats
    __main__.py        ``python -m reference --port 9200``
"""
