"""The job-level error of every configuration module (pipeline/config.py, pipeline/answers.py), in
a module of its own so both can raise it without importing each other."""


class ConfigError(ValueError):
    """A configuration value that cannot work; raised at start-up, before any row is read."""
