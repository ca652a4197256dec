"""reporter: scheduled email reports on Celery.

The data flows schedules.yaml -> config -> beat -> dispatch -> render -> deliver -> ledger,
one module per step.
"""

__version__ = "0.1.0"
