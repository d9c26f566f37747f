"""lifealign: keep a language model aligned while its preferences change over time.

Layers (data flows one way): ``config`` → ``data`` + ``models`` → ``training`` (+ ``continual`` plugins,
``unlearning``) → ``evaluation`` → ``report``; ``pipeline`` runs the whole job and ``cli`` parses arguments.
"""

__version__ = "0.1.0"
