"""preftune: align causal language models to preference data directly (DPO and its family).

From Python, ``from preftune.api import train``, then
``train("dpo", model=..., train=rows, **{"train.max_steps": 10})`` runs a training command;
importing preftune loads no torch.
"""

import logging

__version__ = "0.1.0"

# bitsandbytes, which peft imports whenever it is installed, warns on CPUs with AVX512-BF16 that
# an optional kernel could not be fetched from the hub, then uses its own: not worth a line on
# every run.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__all__ = ["__version__"]
