"""indigrad: per-example gradients, norms and clipped sums for PyTorch models.

>>> import torch, torch.nn.functional as F, indigrad
>>> model = torch.nn.Linear(4, 3)
>>> x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
>>> with indigrad.capture(model) as cap:
...     norms = cap.norms(F.cross_entropy(model(x), y, reduction="none"))
>>> norms.shape
torch.Size([8])
"""

from . import dp as dp
from . import testing as testing
from .capture import capture
from .quantities import PerExample
from .rules import Rule, lookup_rule, register_rule, registered_rules, unregister_rule

__version__ = "0.1.0"

__all__ = [
    "PerExample",
    "Rule",
    "__version__",
    "capture",
    "dp",
    "lookup_rule",
    "register_rule",
    "registered_rules",
    "testing",
    "unregister_rule",
]
