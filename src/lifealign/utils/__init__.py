"""Helpers with no dependency on the rest of the package (JSON I/O, keyword binding)."""
