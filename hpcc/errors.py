"""One exception type per concern, each with the exit status the CLI gives it.

Every message is one line that says what is wrong and, where it helps, what to do.
They are rendered once, at the CLI edge (`hpcc.cli`, `hpcc.gateway.cli`), never as tracebacks.
"""

# Exit codes, as the user documentation gives them (README.md; docs/launcher.md, "Exit status").
EXIT_OK = 0
EXIT_USER = 1        # bad reference, missing image, bad config, bad image content
EXIT_USAGE = 2       # bad command line
EXIT_REGISTRY = 3    # registry or network failure
EXIT_LAUNCH = 125    # hpcc failed before the command ran
EXIT_NOEXEC = 126    # command found but not executable
EXIT_NOTFOUND = 127  # command not found


class HpccError(Exception):
    """Base class: an expected failure with a one-line message."""

    exit_code = EXIT_USER

    def __init__(self, message, *, hint=None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self):
        if self.hint:
            return f"{self.message}; {self.hint}"
        return self.message


class UsageError(HpccError):
    exit_code = EXIT_USAGE


class ConfigError(HpccError):
    pass


class ReferenceError_(HpccError):
    """A malformed image reference (named with a trailing _ so as not to shadow the builtin)."""


class RegistryError(HpccError):
    exit_code = EXIT_REGISTRY


class NotInRegistry(HpccError):
    """The registry has no such repository or tag: a user error (exit 1), since retrying
    will not help (scripts retry exit 3)."""


class ImageError(HpccError):
    """Bad image content: malformed manifest, wrong digest, corrupt layer, hostile entries."""


class StoreError(HpccError):
    pass


class ImageNotFound(StoreError):
    pass


class SquashfsError(HpccError):
    pass


class MountError(HpccError):
    exit_code = EXIT_LAUNCH


class LaunchError(HpccError):
    exit_code = EXIT_LAUNCH


class HookError(HpccError):
    exit_code = EXIT_LAUNCH


class SlurmError(HpccError):
    """Slurm's clients are missing, the controller does not answer, or a reply is malformed."""
