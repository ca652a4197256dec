"""reporter's benchmark suite (issue 11): `python -m bench [--quick] [--only NAME] [--json FILE]`.

Not part of the installed package. Every figure runs against real parts (a private Redis, an SMTP
sink, SQLite and PostgreSQL ledgers, real worker processes) and is printed beside a baseline
measured in the same run, so the ratios mean something on a noisy machine.
"""
