"""A user's own package, as the config tests use it: a model class, a loss and a data function.

It stands for code jaxlight has never seen: ``class_path: userpkg.nets.Net`` in a run config.
"""
