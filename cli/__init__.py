"""The ``spectral-guard`` command line (installed as ``spectral_guard.cli``)."""
