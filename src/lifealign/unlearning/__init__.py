"""U2A, unlearning to align (METHODS.md §2): impact scores, selection and mirror-descent weights, the weighted inner
unlearning on the one training loop, baselines, ``lifealign unlearn`` and the negative-only tasks of a stream.

- ``influence.py``: ``s_i = <H^-1 grad J, grad l_u(x_i)>`` for all candidates from one batched backward per batch
  (``fast_scores``), the per-example reference (``naive_scores``), LiSSA / conjugate gradient.
- ``selection.py``: the sign convention (``dJ/dw_i = -s_i``), top-k, exponentiated-gradient weights.
- ``inner.py`` + ``plugins.py``: one weighted solve through ``train_task``; regulariser, retain term, stop rule.
- ``u2a.py``: the bi-level procedure; ``baselines.py``: the comparisons under U2A's budget; ``evaluate.py``: the
  evaluation against the original model; ``data.py``: U2A's splits; ``objectives.py``: the inner objectives.
- ``lifealign unlearn`` and the ``kind: negative`` tasks of ``lifealign run`` are run by ``lifealign.engine``.

The submodules import torch and peft; import them directly (this package's import stays light).
"""
