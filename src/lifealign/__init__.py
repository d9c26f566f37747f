"""lifealign: keep a language model aligned while its preferences change over time.

Layers (docs/ARCHITECTURE.md; imports point down only): ``config`` → ``data`` + ``models`` → ``losses`` →
``training`` → ``evaluation`` → ``continual`` plugins and ``unlearning`` → ``report``; ``engine`` runs the job (one
``Run`` per method: phases, commits, resume) and ``cli`` parses arguments.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lifealign")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "unknown"
