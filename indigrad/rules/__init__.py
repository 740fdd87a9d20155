"""Layer rules: one file per layer family, registered for a module class.

Importing this package registers the built-in rules.
"""

from . import activation as activation
from . import attention as attention
from . import conv as conv
from . import embedding as embedding
from . import linear as linear
from . import normalization as normalization
from . import recurrent as recurrent
from .registry import (
    Inner,
    Output,
    Prepared,
    Rule,
    Split,
    Taken,
    lookup_rule,
    prepared,
    register_rule,
    registered_rules,
    unregister_rule,
)

__all__ = [
    "Inner",
    "Output",
    "Prepared",
    "Rule",
    "Split",
    "Taken",
    "lookup_rule",
    "prepared",
    "register_rule",
    "registered_rules",
    "unregister_rule",
]
