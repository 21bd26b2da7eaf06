"""PiCa's conformance run against PEFT's own test suite (see ``scripts/peft_conformance.sh``).

Nothing of peft's test code is stored here: the suite is downloaded at run time, and this package is a
pytest plugin that adds PiCa rows to peft's test tables after import (:mod:`.tables`, rows in
:mod:`.rows`), selects the PiCa items, marks the ones that cannot apply to PiCa by design
(:mod:`.expectations`, each with its reason) and writes a JSON summary (:mod:`.summary`).
"""
