"""A node as a process: settings (environment, ``.env``, command line) and their checks,
lifecycle and signals, logging, ``/metrics`` and ``/healthz``, and background housekeeping."""
