import sys

from epgx.cli import main

sys.exit(main())
