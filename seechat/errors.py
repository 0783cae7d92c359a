"""Errors a user can act on: every message says what is wrong and what to do."""


class SeeChatError(Exception):
    """A problem with the user's input, files or settings (not a bug in seechat).

    Command-line front ends print the message on one line and exit with status 2;
    servers turn it into a 4xx answer.
    """


class ImageError(SeeChatError):
    """An image that cannot be read: missing, corrupt, truncated, too large or not an image."""


class ModelDirError(SeeChatError):
    """A model directory (or an expert it refers to) that cannot be loaded."""


class ConfigError(SeeChatError):
    """A configuration value or file that is not valid."""


class ContextOverflowError(SeeChatError):
    """A conversation that does not fit the text expert's context, even after dropping old turns."""


class DataError(SeeChatError):
    """A data file (captions, references, questions, a benchmark table) that cannot be read or lacks a field."""
