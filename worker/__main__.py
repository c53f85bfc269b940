"""`python -m worker`: the launcher (one worker process per visible GPU); see `worker.launcher`."""

import sys

from .launcher import main

sys.exit(main())
