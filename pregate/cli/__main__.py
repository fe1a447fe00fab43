import sys

from pregate.cli import main

sys.exit(main())
