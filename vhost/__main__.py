"""``python -m vhost``: the same program as ``vhost-user-blk``."""

import sys

from vhost.cli import blk_main

sys.exit(blk_main())
