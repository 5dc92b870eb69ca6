"""The tiny world: a synthetic knowledge base, its pretraining corpus and a tiny base model.

It ships inside the package (``sftknow_eval/world_data``) so every stage runs offline on a
CPU. ``build`` makes it from a seed; ``shipped`` locates the shipped copy.
"""
