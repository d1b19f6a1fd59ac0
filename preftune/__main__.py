import sys

from preftune.cli import main

sys.exit(main())
