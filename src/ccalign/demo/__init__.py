"""The embedded default: fine-tuning on Fashion-MNIST from a bundled base model, against CFG.

``settings`` (what to run), ``bundles`` (each family's bundled tokenizer and base model),
``recipes`` (each method's demo recipe), ``pipeline`` (the stages), ``report``, ``single`` and
``compare`` (what it writes).
"""
