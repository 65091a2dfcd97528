"""``python -m testkit compiled [--or-plain]``: the compiled build (testkit/compiled.py),
as `make run` and a developer ask for it. (Not ``-m testkit.compiled``: the package
imports that module first, and runpy warns when it runs a module imported already.)"""

from __future__ import annotations

import sys

from testkit import compiled

if sys.argv[1:2] != ["compiled"]:
    sys.exit("usage: python -m testkit compiled [--or-plain]")
sys.exit(compiled.main(sys.argv[1:]))
