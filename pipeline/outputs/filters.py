"""Which objects of a run ``autolabel report`` and ``autolabel export`` take, and the storage
options they are given.

``ObjectFilter`` is one definition of ``--min-mask-score/--min-area/--classes/--flagged/
--unflagged/--include-duplicates`` with three consumers: a SQL predicate for the report's duckdb
queries, a pyarrow expression for the exports' streaming reads, and a line of text saying what was
applied (so a filtered report or export never passes for the whole run). Both predicates read the
objects table normalised and reviewed (outputs/rundata.py): objects a person reviewed pass
``--min-mask-score`` (a person checked them).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

import pyarrow.compute as pc

from pipeline.outputs.columns import REVIEW_COLUMN


class FilterError(ValueError):
    """A filter the user must fix (bad value or unknown class)."""


CREDENTIAL_KEY = re.compile(r"key|secret|token|pass|cred|auth|sas|sig|session", re.IGNORECASE)


class OptionError(ValueError):
    """A malformed ``--storage-option``/``--image-storage-option`` (the message never shows its value)."""


def parse_storage_options(items: Optional[list[str]], flag: str = "--storage-option") -> dict:
    """``["key=ID", "secret=S", "endpoint_url=http://h:9000", "anon=true"]`` -> fsspec storage options.

    Values are read like ``autolabel run``'s key=value overrides: YAML booleans, numbers, lists and
    mappings (``client_kwargs={region_name: eu-west-1}``), other text exactly as typed; values of
    credential-like keys (``key``, ``secret``, ``token``, ...) stay text even when they look like
    numbers or booleans.
    A repeated key is refused. Error messages name the key only, never a value."""
    import yaml

    options: dict = {}
    for n, item in enumerate(items or [], 1):
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            # The item is not shown: without its '=' it may well be a bare secret.
            raise OptionError(f"{flag} number {n} is not key=value (e.g. {flag} endpoint_url=http://127.0.0.1:9000)")
        if key in options:
            raise OptionError(f"{flag} {key} is given twice")
        value = raw
        try:
            parsed = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            parsed = raw
        if isinstance(parsed, (dict, list)):
            value = parsed
        elif CREDENTIAL_KEY.search(key):
            value = raw  # a password "yes" or "0123" stays the text it is
        elif isinstance(parsed, (bool, int, float)) or (parsed is None and raw.strip() in ("null", "~")):
            value = parsed
        options[key] = value
    return options


@dataclass(frozen=True)
class ObjectFilter:
    min_mask_score: Optional[float] = None
    min_area: Optional[int] = None
    class_ids: tuple[int, ...] = ()
    class_names: tuple[str, ...] = field(default_factory=tuple)
    flagged: Optional[bool] = None  # True: --flagged (needs_review), False: --unflagged, None: both
    include_duplicates: bool = False  # --include-duplicates: also masks marked status=duplicate

    @classmethod
    def parse(cls, min_mask_score: Optional[float] = None, min_area: Optional[int] = None, classes: Optional[str] = None,
              flagged: bool = False, unflagged: bool = False, include_duplicates: bool = False) -> "ObjectFilter":
        """``--classes person,car`` or ``--classes 0,2`` (names and ids may be mixed)."""
        if flagged and unflagged:
            raise FilterError("--flagged and --unflagged exclude each other: give one (or neither, for all objects)")
        if min_mask_score is not None and not 0.0 <= min_mask_score <= 1.0:
            raise FilterError(f"--min-mask-score must be between 0 and 1 (got {min_mask_score})")
        if min_area is not None and min_area < 0:
            raise FilterError(f"--min-area must be >= 0 pixels (got {min_area})")
        ids, names = [], []
        for item in (classes or "").split(","):
            item = item.strip()
            if not item:
                continue
            (ids.append(int(item)) if item.isdigit() else names.append(item))
        if classes is not None and not ids and not names:
            raise FilterError("--classes needs at least one class name or id, e.g. --classes person,car or --classes 0,2")
        return cls(min_mask_score, min_area, tuple(ids), tuple(names), True if flagged else False if unflagged else None,
                   bool(include_duplicates))

    @property
    def active(self) -> bool:
        return (self.min_mask_score is not None or self.min_area is not None or bool(self.class_ids or self.class_names)
                or self.flagged is not None or self.include_duplicates)

    def check_classes(self, known: dict[int, str]) -> None:
        """Refuse class names/ids the run does not have (a typo would silently select nothing)."""
        bad = [str(i) for i in self.class_ids if i not in known] + [n for n in self.class_names if n not in known.values()]
        if bad:
            shown = ", ".join(f"{i}={n}" for i, n in sorted(known.items())[:40])
            raise FilterError(f"--classes: {', '.join(bad)} not in this run's classes ({shown}{' ...' if len(known) > 40 else ''})")

    def sql(self) -> str:
        """Predicate over the normalised objects table's columns, for duckdb (``TRUE`` when nothing is filtered);
        ``status``/``candidate`` (which rows are objects) are ``RunData.counted_sql``'s."""
        parts = []
        if self.min_mask_score is not None:
            parts.append(f"(mask_score >= {float(self.min_mask_score)!r} OR {REVIEW_COLUMN} IS NOT NULL)")
        if self.min_area is not None:
            parts.append(f"area >= {int(self.min_area)}")
        if self.class_ids or self.class_names:
            alternatives = []
            if self.class_ids:
                alternatives.append(f"class_id IN ({', '.join(str(int(i)) for i in self.class_ids)})")
            if self.class_names:
                quoted = ", ".join("'" + n.replace("'", "''") + "'" for n in self.class_names)
                alternatives.append(f"class_name IN ({quoted})")
            parts.append("(" + " OR ".join(alternatives) + ")")
        if self.flagged is not None:
            parts.append("needs_review IS TRUE" if self.flagged else "needs_review IS NOT TRUE")
        return " AND ".join(parts) if parts else "TRUE"

    def expression(self) -> Optional[pc.Expression]:
        """The same predicate as a pyarrow expression (None when nothing is filtered)."""
        expr = None

        def both(a, b):
            return b if a is None else a & b

        if self.min_mask_score is not None:  # null >= x is null, and null | true is true (Kleene logic, as in SQL)
            expr = both(expr, (pc.field("mask_score") >= self.min_mask_score) | pc.field(REVIEW_COLUMN).is_valid())
        if self.min_area is not None:
            expr = both(expr, pc.field("area") >= self.min_area)
        if self.class_ids or self.class_names:
            cls_expr = None
            if self.class_ids:
                cls_expr = pc.field("class_id").isin(list(self.class_ids))
            if self.class_names:
                by_name = pc.field("class_name").isin(list(self.class_names))
                cls_expr = by_name if cls_expr is None else cls_expr | by_name
            expr = both(expr, cls_expr)
        if self.flagged is not None:
            flagged = pc.field("needs_review").is_valid() & pc.field("needs_review")  # null (no QA) counts as not flagged
            expr = both(expr, flagged if self.flagged else ~flagged)
        return expr

    def keeps_class(self, class_id: int, class_name: str) -> bool:
        if not (self.class_ids or self.class_names):
            return True
        return class_id in self.class_ids or class_name in self.class_names

    def describe(self) -> str:
        parts = []
        if self.min_mask_score is not None:
            parts.append(f"mask_score >= {self.min_mask_score}")
        if self.min_area is not None:
            parts.append(f"area >= {self.min_area} px")
        if self.class_ids or self.class_names:
            parts.append("classes " + ", ".join([*map(str, self.class_ids), *self.class_names]))
        if self.flagged is not None:
            parts.append("flagged for review" if self.flagged else "not flagged for review")
        if self.include_duplicates:
            parts.append("duplicates included")
        return "; ".join(parts) if parts else "none"

    def as_dict(self) -> dict:
        return {
            "min_mask_score": self.min_mask_score,
            "min_area": self.min_area,
            "classes": [*self.class_ids, *self.class_names] or None,
            "flagged": self.flagged,
            "include_duplicates": self.include_duplicates,
        }
