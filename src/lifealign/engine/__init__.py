"""The one run engine: phases, commits and resume (``run.py``), the stages of a task (``stages.py``), a method's
stream (``stream.py``), ``lifealign unlearn`` (``unlearn.py``), the whole job (``experiment.py``) and the binding of a
config to the registries at load time (``specs.py``). The submodules import torch; import them directly."""
