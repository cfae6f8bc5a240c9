"""The API surfaces, one `Dialect` each (dialect.py is the seam the proxy drives)."""
