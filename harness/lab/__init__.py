"""labgrid integration: a console driver for a mirrorfw controller bound to
labgrid's serial resources, and a strategy whose states are the
controller's (off -> formatted -> replicating).

Importing this package registers both with labgrid's target factory, so an
environment YAML names them once it lists ``harness.lab`` under
``imports`` (see env.example.yaml here). labgrid is the ``lab`` extra:
``pip install 'mirrorfw[lab]'``.
"""

from harness.lab.driver import MirrorfwConsoleDriver, console_url
from harness.lab.strategy import MirrorfwStrategy, Status

__all__ = ["MirrorfwConsoleDriver", "MirrorfwStrategy", "Status", "console_url"]
