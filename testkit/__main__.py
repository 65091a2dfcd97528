"""``python -m testkit compiled [--or-plain]``: the compiled build (testkit/compiled.py),
as `make run` and a developer ask for it. (Not ``-m testkit.compiled``: the package
imports that module first, and runpy warns when it runs a module imported already.)"""

from __future__ import annotations

import sys

from testkit import compiled

sys.exit(compiled.main(sys.argv[1:]))
