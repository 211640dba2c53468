"""One exception type for bad user input, printed as a single line by the CLI."""


class ConfigError(ValueError):
    """A parameter, path or file the user supplied is unusable.

    The message always names the key, the bad value and what is allowed, so the
    CLI can print it as one line without a traceback.
    """

    def __init__(self, key: str, value: object, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={value!r} is not valid: {allowed}")
