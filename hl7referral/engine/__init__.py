"""The Twisted shell: it moves bytes and time around the sans-I/O core.

Protocol (:mod:`mllp`) apart from factory apart from service (:mod:`service`);
the reactor is injected everywhere, so tests drive time with ``task.Clock``.
"""
