"""Names looked up by string (models, layers, spec fields, config keys): one rule for "did you mean".

Every lookup that can fail on a misspelt name ends its error with :func:`suggest`, so a typo in a
spec, an override or a YAML file is answered the same way wherever it is made. "Near" is difflib's
ratio (twice the matching characters over the total) of at least :data:`CUTOFF`.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping

__all__ = ["CUTOFF", "UnknownComponentError", "close_names", "suggest", "unknown_component"]

# The configs' rule, looser than difflib's 0.6: a short key with a letter or two off still finds
# its name ("lrate" -> "lr" scores 0.57).
CUTOFF = 0.5


def close_names(name: str, choices: Iterable[str], n: int = 1) -> list[str]:
    """Up to ``n`` of ``choices`` near ``name``, nearest first."""
    return difflib.get_close_matches(name, list(choices), n=n, cutoff=CUTOFF)


def suggest(name: str, choices: Iterable[str], shown_as: Mapping[str, str] | None = None) -> str:
    """``" (did you mean 'x'?)"`` naming the choice nearest to ``name``, or ``""`` when none is near.

    ``choices`` are the names compared with ``name`` (a registry dict gives its keys);
    ``shown_as`` maps a choice to the name to suggest (a config key's leaf ``lr`` to ``optim.lr``).
    """
    near = close_names(name, list(choices))
    if not near:
        return ""
    return f" (did you mean {(shown_as or {}).get(near[0], near[0])!r}?)"


class UnknownComponentError(KeyError, ValueError):
    """A component name that is not registered; the message names the nearest.

    Subclasses both ``KeyError`` (it is a failed registry look-up) and ``ValueError`` (it is a bad
    config value), and prints its message without the quotes ``KeyError`` adds.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def unknown_component(
    kind: str, name: str, known: Iterable[str], aliases: Mapping[str, str] | None = None
) -> UnknownComponentError:
    """The error for a ``kind`` (``"channel mixer"``) called ``name`` that registry ``known`` lacks,
    naming the nearest name (``aliases`` included) and listing the registered ones and aliases."""
    aliases = aliases or {}
    listed = ", ".join(sorted(known))
    if aliases:
        listed += "; aliases: " + ", ".join(f"{a} -> {t}" for a, t in sorted(aliases.items()))
    return UnknownComponentError(f"unknown {kind} {name!r}{suggest(name, [*known, *aliases])}; registered: {listed}")
