"""PiCa's name in peft: the ``PeftType.PICA`` enum member and the parameter prefix (peft 0.21 keeps
``PeftType`` a str-enum; the member is added with ``aenum.extend_enum``, once per process)."""

from __future__ import annotations

import aenum
from peft.utils.peft_types import PeftType

__all__ = ["PICA_NAME", "PICA_PEFT_TYPE", "PICA_PREFIX"]

PICA_NAME = "pica"
PICA_PREFIX = "pica_"

if not hasattr(PeftType, PICA_NAME.upper()):
    aenum.extend_enum(PeftType, PICA_NAME.upper(), PICA_NAME.upper())
PICA_PEFT_TYPE: PeftType = getattr(PeftType, PICA_NAME.upper())
