"""The run's memo: an artifact is made once per run object, then the same object is returned."""

import functools


def made_once(method):
    """Make the artifact on the first call with these arguments; return the same object after."""

    @functools.wraps(method)
    def cached(self, *args):
        key = (method.__name__, *args)
        if key not in self._made:
            self._made[key] = method(self, *args)
        return self._made[key]

    return cached
