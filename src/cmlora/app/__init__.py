"""Front-ends: the ``cmlora`` command line (``cli``: generate, profile, sweep, eval, report) and
the web app. They build ``cmlora.request.GenerationRequest`` objects and read the records the core
returns; nothing below this package imports it, and the front-ends never import each other
(``cli`` only assembles their subcommands). ``arguments`` and ``method_flags`` are the flags the
commands share."""
