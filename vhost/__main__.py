"""``python -m vhost``: the registered devices; ``python -m vhost DEVICE ...`` runs one."""

import sys

from vhost.cli import main

sys.exit(main())
