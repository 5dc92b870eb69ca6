"""Knowledge-mastery probing (docs/METHOD.md §2): sample a base model on every fact, score, categorize.

Modules: ``categories`` (pure score -> category rules, both schemes), ``requests`` (settings
and the prompts a fact is probed with), ``backend`` (lm-eval model backends and N distinct
samples per prompt), ``run`` (the resumable probe and its output folder), ``card`` (the
dataset card), ``annotated`` (reading a finished output folder: ``load_annotated``).
"""
