"""The app: find the most similar photos of the collection for a new photo.

:class:`~stages.search.query.QueryEngine` answers a query; :mod:`stages.search.serve` is
the web app and its page; :mod:`stages.search.cli` the `index`, `similar` and `serve`
commands.  (This face imports nothing: the CLI loads `stages.search.cli` to parse
arguments, and that must stay light.)
"""
