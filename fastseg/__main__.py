import sys

from fastseg.cli import main

sys.exit(main())
