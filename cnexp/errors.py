"""One exception type for every user-fixable problem: run.py prints its message, no traceback."""


class CnexpError(Exception):
    """A problem the user can fix; the message names the file, field or override and the fix."""


class ConfigError(CnexpError):
    """A knob's value, or a combination of knobs, that cannot run; names the override."""
