import sys

from kvmufw_hook.cli import main

sys.exit(main())
