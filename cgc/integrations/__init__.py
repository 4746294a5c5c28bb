"""CGC inside the trainers people already use.

- :class:`CGCStep` (:mod:`cgc.integrations.step`): the term, its safeguards and its logs in
  another framework's training step, written once for every trainer (and your own loop);
- :mod:`cgc.integrations.huggingface`: ``CGCTrainer`` and ``CGCTrainingArguments`` for Hugging
  Face's ``Trainer`` (needs ``transformers`` and ``accelerate``: the ``hf`` extra);
- :mod:`cgc.integrations.lightning`: ``CGCClassifier``, a ``LightningModule`` (needs
  ``lightning``: the ``lightning`` extra).

The two framework modules import their framework; import them by name.
"""

from .step import CGCStep, position

__all__ = ["CGCStep", "position"]
