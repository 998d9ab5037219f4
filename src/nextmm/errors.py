"""User-facing errors. The CLI prints these as one sentence and exits 2; anything else is a bug and
keeps its traceback."""


class UserError(ValueError):
    """A mistake in what the user gave nextmm (a path, a file, a config, a prompt), with its fix."""
