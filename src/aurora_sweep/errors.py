"""The one exception users see.

Anything a user can fix (a broken config, a missing file, a refused request) is raised as an
`AuroraSweepError` whose message says what is wrong and what to do. The CLI prints it on one line
and exits non-zero; any other exception is a bug and keeps its traceback.
"""


class AuroraSweepError(Exception):
    """A problem the user can fix; the message says how."""
