"""The error types the CLI turns into one clear line instead of a traceback."""


class UserError(Exception):
    """Bad input from the user: a config key, a file, a record, an option.

    The CLI prints the message as one line and exits with code 2; the message must name the
    offending key, file or record so the user can fix it without reading a traceback.
    """

    exit_code = 2


class ServiceError(Exception):
    """A service the runner depends on (MLflow's tracking server or registry) failed mid-operation.
    Nothing was changed that a re-run cannot finish; the CLI prints one line and exits with code 1."""

    exit_code = 1


class Interrupted(Exception):
    """The user stopped a sweep (Ctrl-C, SIGINT): its state is saved and `--resume` finishes it; nothing after
    the sweep (promotion) runs. The CLI prints one line and exits with code 130, as an interrupted shell command."""

    exit_code = 130
