"""Every default reporter uses, in one place. The string under each names what it is for."""

CONFIG_PATH = "schedules.yaml"
"""Config file read when REPORTER_CONFIG is unset (relative to the working directory)."""

TEMPLATES_DIRNAME = "templates"
"""Templates folder beside the config file when REPORTER_TEMPLATES is unset."""

VAR_DIR = "var"
"""Folder for local state of the embedded defaults: ledger, outbox, broker address, logs."""

DATABASE_URL = "sqlite:///var/reporter.db"
"""Ledger database when REPORTER_DATABASE_URL is unset."""

OUTBOX = "var/outbox"
"""Maildir that receives mail when REPORTER_SMTP_URL is unset."""

TIMEZONE = "UTC"
"""IANA zone for crons that name none."""

SENDER = "Reports <reports@example.com>"
"""From address when the config's defaults name none."""

RATE_LIMIT = "1/s"
"""Emails per second, across all workers."""

SOFT_TIME_LIMIT = 100
"""Seconds before a send task is asked to stop (SoftTimeLimitExceeded)."""

TIME_LIMIT = 120
"""Seconds before a send task's worker process is killed; must exceed the soft limit."""

MAX_RETRIES = 5
"""Retries of a transient delivery failure before it is recorded as failed."""

RETRY_BACKOFF = 10
"""Seconds of the first retry delay; doubled each retry, with full jitter."""

RETRY_BACKOFF_MAX = 600
"""Longest retry delay in seconds."""

CATCH_UP_GRACE = 3600
"""Seconds: a slot missed while beat was down is still sent if it is at most this old."""

RETENTION_DAYS = 90
"""Ledger rows older than this many days are deleted by email_reports.prune_ledger."""

MAX_ROWS = 5000
"""Rows shown in a report's HTML body, text part and PDF; the CSV attachment always has every row."""

MAX_ATTACHMENT_BYTES = 10_000_000
"""Bytes: a PDF or CSV larger than this is left out of the email, with a note saying so."""

QUERY_TIMEOUT = 60
"""Seconds a report's SQL query may run (PostgreSQL and SQLite) before it is stopped."""

FETCH_MAX_BYTES = 10_000_000
"""Bytes: the largest resource (image, stylesheet) a PDF may load from an allowed http(s) host."""

SMTP_TIMEOUT = 30
"""Seconds for each SMTP network operation."""

CONNECT_CHECK_TIMEOUT = 5
"""Seconds `reporter validate --connect` waits for a datasource or the SMTP server to answer."""

QUEUE_SCHEDULED = "reporter.scheduled"
"""Queue of sends enqueued by the dispatcher."""

QUEUE_URGENT = "reporter.urgent"
"""Queue of send-now requests; workers take it first so a backlog never delays them."""

QUEUES = (QUEUE_URGENT, QUEUE_SCHEDULED)
"""Every queue, in the order a worker takes them: urgent first."""

TASK_DISPATCH = "email_reports.schedule_hourly"
"""The dispatcher: enqueues the report slots due in its window."""

TASK_SEND = "email_reports.send"
"""Render one report slot and send it to its recipients."""

TASK_PRUNE = "email_reports.prune_ledger"
"""Delete ledger rows older than the retention."""

TASK_SWEEP = "email_reports.sweep"
"""Re-enqueue deliveries whose task was lost; beat runs it every minute whatever the YAML says."""

SWEEP_INTERVAL = 60
"""Seconds between two runs of the sweep (a beat entry every deployment has); 60: every minute on the minute."""

SWEEP_GRACE = 120
"""Seconds a row may stay queued past its slot, untouched, before the sweep takes its task for lost."""

CLAIM_MARGIN = 30
"""Seconds past the hard time limit before a claim counts as abandoned by a killed process."""

BEAT_TASKS = (TASK_DISPATCH, TASK_PRUNE, TASK_SWEEP)
"""Tasks a beat entry may name (email_reports.send needs a report and a slot, so it cannot be one)."""

TASKS = (TASK_SEND, *BEAT_TASKS)
"""Every task reporter registers."""

DISPATCH_WINDOW = 3600
"""Seconds covered by a dispatcher called by hand when no beat entry names its cron."""

VISIBILITY_MARGIN = 600
"""Seconds added to the longest ETA plus the hard time limit for Redis' visibility_timeout."""

RELOAD_INTERVAL = 5
"""Seconds between two looks of a process at schedules.yaml and the templates for an edit."""

SEND_WAIT = 120
"""Seconds `reporter send` waits for the workers to finish a send-now before giving up."""

BEAT_LEADER_KEY = "reporter:beat:leader"
"""Redis key of the beat leader lock: JSON {id, host, pid, since}, expiring unless renewed."""

BEAT_TICK_KEY = "reporter:beat:tick"
"""Redis key beat writes on every tick: JSON {id, at}; its age tells whether beat is alive."""

BEAT_LOCK_TIMEOUT = 30
"""Seconds a beat leader lock lives without renewal; a standby takes over after this."""

METRICS_PORT = 9808
"""Suggested port for workers' Prometheus metrics (REPORTER_METRICS_PORT)."""

FLOWER_PORT = 5555
"""Flower's port when FLOWER_PORT is unset (Flower's own default)."""

NOTICE_COOLDOWN = 3600
"""Seconds: a report's owners get at most one failure notice in this time."""

WORKER_MAX_TASKS_PER_CHILD = 200
"""Tasks after which a worker process is replaced: hands back what WeasyPrint's and fontconfig's caches keep."""

WORKER_MAX_MEMORY_PER_CHILD = 400_000
"""KiB a worker process may grow past its resident memory at start before it is replaced once its task ends (a long
PDF takes hundreds of MB)."""

BROKER_URL = "redis://127.0.0.1:6379/0"
"""Broker when REPORTER_BROKER_URL is unset and no `reporter run` is running in this folder (Celery's usual Redis)."""
