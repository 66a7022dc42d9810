"""``python -m workers module:function --redis-url URL``: see :mod:`workers.cli`."""

from workers.cli import main

raise SystemExit(main())
