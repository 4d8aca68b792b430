"""The ``ingest`` command line: a thin adapter over the core, the web app and the workers."""
