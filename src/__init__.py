"""lightning-transfer: transfer learning for image classification with Lightning and Hydra."""

import time

# When this interpreter imported the package: `python -m src.train` imports it first, so run
# timings count from the command's start, not from the process's (an exec'ing shell's: `bash -c
# "pip install ... && python -m src.train"` runs python in the process that ran pip).
STARTED = time.monotonic()
