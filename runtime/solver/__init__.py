"""The solver: modes that run two models (or a model and its MTP head) together.

`accept.py` is the speculative accept/resample rule; the modes that draft and verify build on it.
"""
