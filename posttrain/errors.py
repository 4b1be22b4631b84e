class ConfigError(ValueError):
    """A user mistake: one line naming the field/file and what would be valid."""
