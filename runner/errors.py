"""The one error type that means "the user gave us something wrong"."""


class UserError(Exception):
    """Bad input from the user: a config key, a file, a record, an option.

    The CLI prints the message as one line and exits with code 2; the message must name the
    offending key, file or record so the user can fix it without reading a traceback.
    """

    exit_code = 2
