"""The policy simulator (docs/design.md §5): `core` holds the maths, `server` serves the page.

Importing this package imports neither; `core` needs only numpy.
"""
