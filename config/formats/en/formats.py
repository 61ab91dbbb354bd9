"""Dates as operators read logs: to the second, 24-hour, year first (the admin's saga pages).

Retries and compensations are seconds apart; "Dec. 2, 2026, 12:07 p.m." hides
that. The log's own columns show milliseconds (sagas.admin).
"""

DATETIME_FORMAT = "Y-m-d H:i:s"
SHORT_DATETIME_FORMAT = "Y-m-d H:i:s"
DATE_FORMAT = "Y-m-d"
TIME_FORMAT = "H:i:s"
