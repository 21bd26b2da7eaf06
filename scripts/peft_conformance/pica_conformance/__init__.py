"""PiCa's conformance run against PEFT's own test suite (see ``scripts/peft_conformance.sh``).

Nothing of peft's test code is stored here: the suite is downloaded at run time, and this package is a
pytest plugin that adds PiCa rows to peft's test tables after import (:mod:`.tables`, rows in
:mod:`.rows`), PiCa tests to peft's per-method test classes (:mod:`.added`), points the decoder tests at
local stand-ins of their Hub models (:mod:`.standins`), selects the PiCa items, marks the ones that cannot
apply to PiCa by design (:mod:`.expectations`, each with its reason) and writes a JSON summary
(:mod:`.summary`).
"""
