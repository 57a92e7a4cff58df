"""``python -m wisparse_compile.cli``: the same as the ``wisparse`` script."""

from . import main

raise SystemExit(main())
