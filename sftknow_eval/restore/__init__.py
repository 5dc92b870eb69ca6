"""Parameter restoration (docs/METHOD.md §6): reset the most-changed fine-tuned weights to base values.

On the weights layer (``sftknow_eval.weights``): ``passes`` streams the models, ``pipeline`` owns
everything around the passes, ``stats`` and ``card`` describe each variant, ``commands`` is the CLI.
"""

from sftknow_eval.restore.pipeline import RestoreConfig, RestoreResult, restore

__all__ = ["RestoreConfig", "RestoreResult", "restore"]
