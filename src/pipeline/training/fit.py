"""`fit`: `Trainer.fit`, except that a stop signal stops the caller too.

Lightning turns the signals into endings that look like success to whoever called fit:
Ctrl+C (KeyboardInterrupt) becomes `sys.exit(1)`, which an exit-status mapper cannot tell
from any other exit; SIGTERM with no handler of the caller's becomes `SIGTERMException`, a
`SystemExit` without a code (status 0); and SIGTERM after the last training batch only sets
`trainer.received_sigterm` and fit returns normally, as if training had completed. Here each
becomes the exception of its signal again, so that an MLflow run ends KILLED, no output that
marks completion is written after it, and the process exits 130 or 143.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

from pipeline.errors import Terminated


def fit(trainer: L.Trainer, module: L.LightningModule, **kwargs: Any) -> None:
    """`trainer.fit(module, **kwargs)`; raises KeyboardInterrupt after SIGINT and
    `Terminated` after SIGTERM however Lightning handled them."""
    try:
        trainer.fit(module, **kwargs)
    except SIGTERMException:
        raise Terminated("terminated by SIGTERM during training") from None
    except SystemExit as stop:
        # Lightning's sys.exit(1) inside its `except KeyboardInterrupt`: the context tells.
        if isinstance(stop.__context__, KeyboardInterrupt):
            raise stop.__context__ from None
        raise
    if trainer.received_sigterm:
        raise Terminated("terminated by SIGTERM at the end of training")
