import sys

from oscar_cupy.cli import main

sys.exit(main())
