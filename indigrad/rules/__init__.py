"""Layer rules: one file per layer family, registered for a module class.

Importing this package registers the built-in rules.
"""

from . import linear as linear
from .registry import (
    Rule,
    lookup_rule,
    register_rule,
    registered_rules,
    unregister_rule,
)

__all__ = ["Rule", "lookup_rule", "register_rule", "registered_rules", "unregister_rule"]
