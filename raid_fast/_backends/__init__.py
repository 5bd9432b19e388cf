"""Backends of the dispatcher (``raid_fast._dispatch``): each module exports ``BACKENDS``, a tuple of
``Backend`` tables mapping op names to implementations. ``reference`` (torch, always available) and
``extension`` (``cpp`` and ``cuda``, the compiled ``raid_fast._C``) live here; ``triton`` lives in
``raid_fast.kernels.backend`` beside its kernels."""
