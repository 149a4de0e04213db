import sys

from splitcore.cli.main import main

sys.exit(main())
