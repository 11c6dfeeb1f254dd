"""`python -m tele`: the same CLI as the `tele` script; the daemon spawner runs this."""

import sys

from tele.cli.main import main

sys.exit(main())
