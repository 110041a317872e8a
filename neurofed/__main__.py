import sys

from neurofed.cli import main

sys.exit(main())
