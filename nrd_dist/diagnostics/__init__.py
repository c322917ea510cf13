"""Diagnostics of a trained run on its own training data (docs/diagnostics.md).

* :mod:`.predictions`: one pass of a checkpoint's student and/or teacher over training
  shards, on the plain image and on K AugMix teacher views, kept per sample.
* :mod:`.diagnose`: ``tools/diagnose.py``, the paper's Table 1 and Fig. 1 (accuracy and
  clean-class log-likelihood on clean vs mislabeled samples, mislabel-detection AUROC, ECE).
* :mod:`.find_mislabeled`: ``tools/find_mislabeled.py``, training samples ranked by the
  teacher's disagreement with their label.
"""
