"""The broker connections shared by each broker's source and sink, one module per broker.

Each module holds what a broker's source and sink both need (URL parsing,
credentials and TLS, building the client, reconnecting or retrying), so that
``sources/`` and ``sinks/`` keep only the source and sink classes. Nothing is
imported here: a module needs its broker's extra, so a missing extra only
matters to whoever uses that broker.
"""
